"""A 2-rank run must not abort at exit.

The cause was a process group that outlived ``destroy_process_group``: importing
``torch._dynamo`` after the group exists (the estimate's FlopCounterMode does, so does
torch.compile) makes dynamo hold references to it, so its gloo threads lived on into interpreter
shutdown, where the group's destructor now and then aborted the process. ``Runtime.create``
imports dynamo first and ``Runtime.close`` drops the team groups; these tests check, in real
gloo ranks, that no process-group thread is left once ``close`` returns. Unlike the abort itself
(3 of 78 runs on a loaded machine, bench/results/teardown_stress.md), the leftover threads showed
on every run, so the test fails deterministically without either part of the fix.
"""

from __future__ import annotations

import torch

from distill.runtime import comm_threads
from ranks import launch


def _use_then_close(rt, group_ranks: int) -> dict:
    """What a distillation does to the group, then ``close``: the team of ``group_ranks`` ranks,
    collectives on both groups, dynamo imported by FlopCounterMode (as the estimate does)."""
    from torch.utils.flop_counter import FlopCounterMode

    team = rt.team(group_ranks)
    x = torch.ones(3, requires_grad=True)
    total = team.all_reduce_sum(x * (rt.rank + 1)).sum()
    total.backward()
    rt.all_reduce_sum(torch.ones(2))
    with FlopCounterMode(display=False):
        torch.ones(4, device="meta") * 2
    before = comm_threads()
    rt.close(ok=True)
    return {"before": before, "after": comm_threads(), "grad": x.grad.clone()}


def test_no_process_group_thread_outlives_close(tmp_path):
    ranks = launch(_use_then_close, world=2, args=(2,), out_dir=tmp_path, timeout=300)
    for r in ranks:
        assert any(n.startswith("pt_gloo") for n in r["before"]), r["before"]  # threads are seen
        assert r["after"] == [], r["after"]
        # every rank backpropagates the team's sum of (r+1)·x_r: x_r's gradient is 2 (r+1)
        assert torch.equal(r["grad"], torch.full((3,), 2.0 * (r["rank"] + 1)))


def test_comm_threads_is_empty_without_a_group():
    assert comm_threads() == []
