"""``selmatch estimate``: the memory model's terms, the counted FLOPs against a real replay, the fit
check, profiles, every shipped config, and the recorded CPU validation (bench/memory_model.py)."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from distill import estimate as est
from distill.config_io import load_config
from distill.matching import Student, make_plan, match_replay
from distill.models import build_model
from distill.params import ParamLayout
from distill.preflight import estimate_run
from distill.profiles import Profile, iteration_time, load_profiles
from launch.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))
RESULTS = os.path.join(REPO, "bench", "results", "memory_model_cpu.json")


def net(width=4, depth=1, size=8, channels=1, classes=3) -> est.Network:
    return est.Network(name="convnet", in_channels=channels, num_classes=classes,
                       image_size=size, width=width, depth=depth, norm="batch")


def shape(**kw) -> est.MatchingShape:
    base = dict(net=net(), batch=6, group=3, steps=2, n_images=12, n_matched=12, n_learnable=4,
                joint=True, dsa=False)
    return est.MatchingShape(**{**base, **kw})


def test_rows_per_call_follow_the_path_and_the_teams():
    one = est.memory(shape(batch=12, group=3), "cuda")["activations"]  # eager: one group of 3
    compiled = shape(batch=12, group=3, compiled=True)  # 4 groups, one rank: all in one call
    assert compiled.rows_per_call == 12
    assert est.memory(compiled, "cuda")["activations"] == pytest.approx(4 * one)
    assert shape(batch=12, group=3, compiled=True, groups_per_call=1).rows_per_call == 3
    assert shape(batch=12, group=3, compiled=True, ranks=2).rows_per_call == 6  # 2 groups each
    split = shape(batch=12, group=12, group_ranks=4, ranks=4)  # one group over four ranks
    assert split.rows_per_call == 3
    assert shape(batch=12, group=6, group_ranks=2, ranks=4).rows_per_call == 3  # 2 teams
    assert shape(batch=12, group=6, group_ranks=2, ranks=2).rows_per_call == 6  # 2 groups, 3 each


def test_compiled_path_suggests_fewer_groups_per_call():
    s = shape(batch=12, group=3, compiled=True, ranks=1)
    budget = est.peak_bytes(shape(batch=12, group=3, compiled=True, groups_per_call=2), "cuda")
    assert est.fitting_groups_per_call(s, budget, "cuda") == 2
    assert est.fitting_groups_per_call(s, 1.0, "cuda") is None


def test_team_all_reduces_are_counted():
    c = est.communication(shape(batch=12, group=12, group_ranks=2, ranks=2), 2)
    assert c["team_all_reduces"] == 12 * 1 * 2  # 12 per BN layer and student step, N = 2
    assert est.communication(shape(), 2)["team_all_reduces"] == 0


def test_network_facts_by_hand():
    # conv 1->4 (3x3: 36 + 4), BN (4 + 4), 8x8 -> pool 4x4 -> linear 64->3 (192 + 3)
    assert est.network_facts(net()) == (36 + 4 + 8 + 192 + 3, 4 * 8 * 8)
    p, a = est.network_facts(net(width=128, depth=3, size=32, channels=3, classes=10))
    assert p == 320_010  # docs/distributed.md: ConvNet-128 on CIFAR-10
    assert a == 128 * (32 * 32 + 16 * 16 + 8 * 8)


def test_memory_terms_follow_the_formula():
    s = shape()
    p, a = est.network_facts(s.net)
    co = est.COEFFICIENTS["cuda"]
    m = est.memory(s, "cuda")
    assert m["activations"] == pytest.approx(co.activation * 3 * a * 4)
    assert m["parameter vectors"] == pytest.approx((2 + 1 + co.param_vectors) * p * 4)
    assert m["synthetic set"] == 2 * 12 * 64 * 4  # the set and the matched copy (joint)
    assert m["image gradient"] == 12 * 64 * 4
    assert m["learnable rows' grad + momentum"] == 2 * 4 * 64 * 4
    assert m["runtime"] == co.runtime_bytes
    # activations follow g only: not |b|, not N; θ vectors follow N
    assert est.memory(shape(batch=12, group=3), "cuda")["activations"] == m["activations"]
    assert est.memory(shape(group=6), "cuda")["activations"] == pytest.approx(2 * m["activations"])
    assert (est.memory(shape(steps=12), "cuda")["parameter vectors"] - m["parameter vectors"]
            == pytest.approx(10 * p * 4))
    merge = est.memory(shape(joint=False, n_matched=4), "cuda")
    assert merge["synthetic set"] == 12 * 64 * 4 and merge["image gradient"] == 4 * 64 * 4
    with pytest.raises(ValueError, match="device must be one of cpu, cuda"):
        est.memory(s, "tpu")


class _Flops(TorchDispatchMode):
    """PyTorch's FLOP formulas on every op of a real run (FlopCounterMode itself refuses the
    replay's leaf tensors inside autograd.grad)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


@pytest.mark.parametrize("width,depth,size,batch,group,steps", [(4, 1, 8, 6, 3, 2),
                                                                (8, 2, 16, 8, 8, 3)])
def test_counted_flops_equal_a_real_replay(width, depth, size, batch, group, steps):
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=3, num_classes=3, image_size=size, width=width,
                        depth=depth)
    student = Student.of(model, None, torch.float64, "cpu")
    start = ParamLayout.of(model).flatten(model).detach().double()
    x = torch.randn(12, 3, size, size, dtype=torch.float64)
    plan = make_plan(12, batch=batch, steps=steps, group=group, image_size=(size, size), dsa=None,
                     seed=0, iteration=0)
    with _Flops() as counted:
        match_replay(student, start, start + 0.01, x, torch.arange(12) % 3,
                     torch.tensor(0.01, dtype=torch.float64), plan)
    s = shape(net=net(width, depth, size, channels=3), batch=batch, group=group, steps=steps)
    total, busiest = est.iteration_flops(s)
    assert total == counted.total > 0
    assert est.iteration_flops(s, ranks=batch // group)[1] == total // (batch // group)


def test_fitting_group_is_the_largest_divisor_that_fits():
    s = shape(net=net(width=64, depth=3, size=32, channels=3), batch=120, group=120, steps=10)
    peak = est.peak_bytes(s, "cuda")
    budget = 0.5 * peak
    g = est.fitting_group(s, budget, "cuda")
    assert g is not None and 120 % g == 0 and est.peak_bytes(s.with_group(g), "cuda") <= budget
    bigger = [d for d in range(g + 1, 121) if 120 % d == 0]
    assert all(est.peak_bytes(s.with_group(d), "cuda") > budget for d in bigger)
    assert est.fitting_group(s, 1.0, "cuda") is None  # nothing fits in one byte


def test_storage_and_communication():
    s = shape(steps=5)
    p = s.params
    assert est.expert_storage(100, 50, p) == 100 * 51 * p * 4
    one = est.communication(s, 1)
    assert one["payload_bytes"] == 2 * 5 * p * 4 + (12 * 64 + 1) * 4
    assert one["all_reduces"] == 12 and one["sent_per_rank_bytes"] == 0
    assert est.communication(s, 4)["sent_per_rank_bytes"] == pytest.approx(1.5 * one["payload_bytes"])


def test_parse_size():
    assert est.parse_size("80GiB") == 80 * 2 ** 30
    assert est.parse_size("141 GB") == 141e9
    assert est.parse_size("4096MiB") == 4 * 2 ** 30 and est.parse_size("1000") == 1000
    for bad in ("80 lightyears", "-3GB", "GiB", "0"):
        with pytest.raises(ValueError, match="must be a positive size"):
            est.parse_size(bad)


def test_time_comes_from_the_nearest_record_and_says_how_near(tmp_path):
    """Same network first, then the same ranks, then the nearest FLOPs; the time scales by the
    FLOPs ratio and the estimate says which record it used and how far it is."""
    s = shape(net=net(width=8, depth=2, size=16, channels=3), batch=64, group=32, steps=10,
              dsa=True)
    rec = {"status": "ok", "method": "replay", "device": "cpu", "width": 8, "depth": 2,
           "image_size": 16, "channels": 3, "dtype": "float32", "dsa": True, "threads": 1}
    doc = {"machine": "test box", "records": [
        {**rec, "batch": 32, "group": 32, "steps": 5, "s_per_iter": 5.0},
        {**rec, "batch": 64, "group": 32, "steps": 10, "ranks": 2, "s_per_iter": 7.0,
         "launcher": "accelerate"},
        {**rec, "width": 16, "batch": 64, "group": 32, "steps": 10, "s_per_iter": 99.0}]}
    (tmp_path / "matching_test.json").write_text(json.dumps(doc))
    profiles = load_profiles(str(tmp_path))
    one = iteration_time(s, 1, "cpu", profiles)  # same net and ranks: the first record, scaled
    flops = est.iteration_flops(s, 1)[1]
    rec_flops = est.iteration_flops(dataclasses.replace(s, batch=32, steps=5), 1)[1]
    assert one.seconds == pytest.approx(5.0 * flops / rec_flops) and not one.exact
    assert "test box" in one.source and "|b| 32, g 32, N 5, 1 rank(s)" in one.source
    assert "same network" in one.distance and "same ranks" in one.distance
    assert f"{flops / rec_flops:.3g}× the record's" in one.distance
    two = iteration_time(s, 2, "cpu", profiles)  # two ranks: the loop record, as measured
    assert two.seconds == pytest.approx(7.0) and two.exact and two.distance == "exact match"
    assert "via accelerate" in two.source
    four = iteration_time(s, 4, "cpu", profiles)  # no 4-rank record: the nearest rank count
    assert "2 rank(s) measured vs 4 here" in four.distance
    other = iteration_time(shape(), 1, "cpu", profiles)  # another network: still an estimate
    assert other is not None and "another network shape" in other.distance
    assert iteration_time(s, 1, "cuda", profiles) is None  # another device kind
    assert iteration_time(s, 1, "cpu", [Profile("x", "y", ())]) is None


def test_cuda_time_comes_from_the_recorded_anchors_with_card_and_uncertainty(capsys):
    """No CUDA profile of this repository's code yet: the time on CUDA is a + b·FLOPs fitted over
    the recorded H200 anchors; it names the card and its error, and says when it extrapolates."""
    from distill.profiles import anchor_time, load_anchor_fits

    fits = load_anchor_fits()
    assert len(fits) == 1 and "H200" in fits[0].machine
    fit = fits[0]
    with open(fit.path) as f:
        records = [r for r in json.load(f)["records"] if r["method"] == "replay"]
    # the fit against its own records: each within the error it states, which is small
    like = shape(net=net(width=128, depth=3, size=32, channels=3, classes=10))
    errors = []
    for r in records:
        s = dataclasses.replace(like, batch=r["batch"], group=r["group"], steps=r["steps"])
        t = anchor_time(s, 1, fits)
        assert "inside the measured range" in t.distance and not t.extrapolated
        errors.append(abs(t.seconds - r["s_per_iter"]) / r["s_per_iter"])
    assert max(errors) == pytest.approx(fit.rel_error) and fit.rel_error < 0.1
    cifar = os.path.join(REPO, "configs", "cifar10_ipc250.yaml")
    assert main(["estimate", "--gpus", "8", "--config", cifar]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time:"))
    assert re.search(r"~[0-9.]+ s/iteration, ~[0-9.]+ h for 10,000 iterations ±\d+%", line), line
    assert "anchors_design_h200.json" in line and "H200" in line
    assert "inside the measured range on the same network" in line
    tiny = os.path.join(REPO, "configs", "tiny_ipc50.yaml")  # 64 px, depth 4: not measured
    assert main(["estimate", "--config", tiny]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("time:"))
    assert "EXTRAPOLATED" in line and "uncertainty unknown" in line
    assert anchor_time(like, 1, []) is None


def test_without_anchors_cuda_has_no_time(tmp_path):
    from distill.profiles import load_anchor_fits

    assert load_anchor_fits(str(tmp_path)) == []
    (tmp_path / "anchors_x.json").write_text(json.dumps({"records": []}))  # no network: unused
    assert load_anchor_fits(str(tmp_path)) == []


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_estimates(path, capsys):
    assert main(["estimate", "--config", path, "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "matching-step tensors" in out and "expert trajectories" in out and "fits" in out
    cfg = load_config(path)
    e = estimate_run(cfg, device_memory=80 * est.GIB)
    assert e.experts_storage == est.expert_storage(cfg.experts.num_experts, cfg.experts.epochs,
                                                   e.shape.params)


def test_cli_warns_and_suggests_a_group(capsys):
    cfg = os.path.join(REPO, "configs", "cifar10_ipc1000.yaml")
    assert main(["estimate", "--config", cfg, "--gpus", "8", "--device-memory", "4GiB",
                 "--distill.batch_syn", "1000"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "--distill.bn_group 250 fits" in out
    assert "7 of 8 ranks idle" in out
    assert main(["estimate", "--config", cfg, "--device-memory", "lots"]) == 2
    assert "must be a positive size" in capsys.readouterr().err


def test_distill_logs_the_summary(tmp_path, caplog):
    from launch.distillation import run_distill
    from tiny import prepare, tiny_config

    cfg = prepare(tiny_config(tmp_path, distill={"iterations": 1}))
    with caplog.at_level(logging.INFO, logger="distill.preflight"):
        run_distill(cfg, progress=False)
    assert any("estimate (cpu, eager path, 1 rank(s), |b| 8, g 8, N 3): matching-step tensors" in r.message
               for r in caplog.records)


def _memory_model_module():
    spec = importlib.util.spec_from_file_location(
        "memory_model", os.path.join(REPO, "bench", "memory_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recorded_cpu_measurements_still_within_25_percent():
    """The recorded peaks against today's coefficients: changing the model or COEFFICIENTS
    without recalibrating (python bench/memory_model.py --fit) fails here."""
    mm = _memory_model_module()
    with open(RESULTS) as f:
        recorded = json.load(f)
    rows = mm.compare(recorded["measured"], recorded["default_malloc"])
    held_out = [r for r in rows if r["set"] == "val" and "error" in r]
    assert len(held_out) >= 6
    assert len({(r["batch"], r["group"], r["steps"], r["width"]) for r in held_out}) == len(held_out)
    for r in held_out:
        assert abs(r["error"]) <= mm.TOLERANCE, r
    for r in mm.compare_gpu():
        assert abs(r["error"]) <= mm.TOLERANCE, r


def test_gpu_records_of_this_code_are_compared_when_present(tmp_path):
    mm = _memory_model_module()
    assert mm.compare_gpu_records(str(tmp_path)) == []
    rec = {"method": "replay", "status": "ok", "device": "cuda", "channels": 3, "classes": 10,
           "image_size": 32, "width": 128, "depth": 3, "batch": 500, "group": 500, "steps": 55,
           "n_images": 2500, "peak_gib": 3.9}
    (tmp_path / "matching_h200.json").write_text(json.dumps(
        {"machine": "H200", "records": [rec, {**rec, "device": "cpu"}]}))
    (row,) = mm.compare_gpu_records(str(tmp_path))
    net_ = net(width=128, depth=3, size=32, channels=3, classes=10)
    s = est.MatchingShape(net=net_, batch=500, group=500, steps=55, n_images=2500,
                          n_matched=2500, n_learnable=0, joint=False)
    assert row["predicted_gib"] == pytest.approx((est.peak_bytes(s, "cuda") + 2500 * 3072 * 4)
                                                 / est.GIB)
    assert row["error"] == pytest.approx(row["predicted_gib"] / 3.9 - 1)


@pytest.mark.slow
def test_memory_model_against_a_fresh_cpu_measurement(tmp_path):
    """Two held-out settings measured now, in fresh processes (~2 min on 2 busy cores)."""
    out = tmp_path / "mm"
    subprocess.run([sys.executable, os.path.join(REPO, "bench", "memory_model.py"), "--only",
                    "V1", "V8", "--no-default-malloc", "--out", str(out)], check=True,
                   cwd=REPO, timeout=900)
    rows = json.loads((tmp_path / "mm.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["V1", "V8"]
    for r in rows:
        assert r["status"] == "ok" and abs(r["error"]) <= 0.25, r
