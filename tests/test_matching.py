"""The replayed matching gradient equals a naive full unroll (float64), with and without BN groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.augment import DSA, DSAConfig, FAMILIES
from distill.matching import MatchPlan, Student, make_plan, match_replay, rank_groups
from distill.params import functional_forward
from helpers import match_unrolled, matching_problem, rel

DT = torch.float64


def problem(depth=2, n=12, classes=3, steps=3, batch=6, group=6, dsa=True, seed=0):
    return matching_problem(depth=depth, n=n, classes=classes, steps=steps, batch=batch,
                            group=group, families=FAMILIES if dsa else None, seed=seed)


def naive_unroll(student: Student, start, target, images, labels, lr, plan: MatchPlan):
    """Independent reference: autograd through every step at once, written out plainly."""
    x = images.clone().requires_grad_(True)
    lr = lr.clone().requires_grad_(True)
    theta = start.clone().requires_grad_(True)
    b, g = plan.batch, plan.group
    for step in plan.steps:
        total = 0.0
        for lo in range(0, b, g):
            rows = step.index[lo:lo + g]
            xr = x[rows]
            if step.aug is not None:
                xr = student.dsa.apply(xr, step.aug.slice(lo, lo + g))
            out = functional_forward(student.model, theta, xr, student.layout,
                                     buffers={k: v.clone() for k, v in student.buffers.items()})
            total = total + F.cross_entropy(out, labels[rows], reduction="sum")
        grad = torch.autograd.grad(total / b, theta, create_graph=True)[0]
        theta = theta - lr * grad
    loss = ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()
    gx, glr = torch.autograd.grad(loss, [x, lr])
    return loss.detach(), gx, glr


@pytest.mark.parametrize("depth,group,steps", [(1, 6, 3), (2, 6, 4), (2, 3, 3), (2, 2, 5)])
def test_replay_equals_full_unroll_float64(depth, group, steps):
    args = problem(depth=depth, group=group, steps=steps)
    res = match_replay(*args)
    loss, gx, glr = naive_unroll(*args)
    assert abs(float(res.loss) - float(loss)) <= 1e-12 * abs(float(loss))
    assert rel(res.grad_images, gx) < 1e-8
    assert rel(res.grad_lr, glr) < 1e-8
    assert gx.abs().sum() > 0 and glr.abs() > 0  # the check is not vacuous
    unrolled = match_unrolled(*args)
    assert rel(unrolled.grad_images, gx) < 1e-10 and rel(unrolled.grad_lr, glr) < 1e-10


def test_replay_without_augmentation_and_with_repeated_rows():
    # 12 images, 4 steps of 5: the index stream crosses permutation boundaries
    args = problem(n=10, batch=5, group=5, steps=4, dsa=False)
    res = match_replay(*args)
    _, gx, glr = naive_unroll(*args)
    assert rel(res.grad_images, gx) < 1e-8 and rel(res.grad_lr, glr) < 1e-8


def test_groups_change_the_math_but_grouping_is_exact():
    # BN with groups of 3 is a different function than groups of 6 (docs/design.md §4) ...
    full = match_replay(*problem(group=6))
    grouped = match_replay(*problem(group=3))
    assert rel(grouped.grad_images, full.grad_images) > 1e-3
    # ... and the replay, one group of 3 after another, computes exactly that function: an
    # independent unroll normalising each group of 3 on its own (float64)
    loss, gx, glr = naive_unroll(*problem(group=3))
    assert abs(float(grouped.loss) - float(loss)) <= 1e-12 * abs(float(loss))
    assert rel(grouped.grad_images, gx) < 1e-8 and rel(grouped.grad_lr, glr) < 1e-8
    assert rel(full.grad_images, gx) > 1e-3  # the reference does see the groups


def test_plan_batches_cycle_without_replacement():
    plan = make_plan(10, batch=4, steps=5, group=2, image_size=(8, 8), dsa=None, seed=1,
                     iteration=0)
    stream = torch.cat([s.index for s in plan.steps])
    assert sorted(stream[:10].tolist()) == list(range(10))  # first full pass is a permutation
    assert sorted(stream[10:20].tolist()) == list(range(10))
    again = make_plan(10, batch=4, steps=5, group=2, image_size=(8, 8), dsa=None, seed=1,
                      iteration=0)
    assert all(torch.equal(a.index, b.index) for a, b in zip(plan.steps, again.steps))
    other = make_plan(10, batch=4, steps=5, group=2, image_size=(8, 8), dsa=None, seed=1,
                      iteration=1)
    assert not all(torch.equal(a.index, b.index) for a, b in zip(plan.steps, other.steps))
    with pytest.raises(ValueError, match="must divide"):
        make_plan(10, batch=4, steps=1, group=3, image_size=(8, 8), dsa=None, seed=0, iteration=0)


def test_plan_augmentation_is_per_step_and_replayable():
    dsa = DSA(DSAConfig(families=("color",)))
    a = make_plan(8, batch=4, steps=2, group=4, image_size=(8, 8), dsa=dsa, seed=3, iteration=2)
    b = make_plan(8, batch=4, steps=2, group=4, image_size=(8, 8), dsa=dsa, seed=3, iteration=2)
    for sa, sb in zip(a.steps, b.steps):
        for key in sa.aug.values:
            assert torch.equal(sa.aug.values[key], sb.aug.values[key])
    assert not torch.equal(a.steps[0].aug.values["brightness"], a.steps[1].aug.values["brightness"])


def test_rank_groups_partition():
    for groups in (1, 4, 7):
        for world in (1, 2, 3, 8):
            owned = [list(rank_groups(groups, r, world)) for r in range(world)]
            assert sum(owned, []) == list(range(groups))
