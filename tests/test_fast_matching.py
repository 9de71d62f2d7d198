"""The fast matching path (functional ConvNet, torch.func steps, torch.compile) equals the eager
reference replay in float64, falls back instead of failing, and keeps the host out of the loops.

Two compilers are used. ``backend="eager"`` runs dynamo's full-graph capture of the torch.func
steps without generating code: seconds, so it checks the fast path's mathematics for every DSA
family and grouping in the default run. Inductor (the real fast path: generated C++ on CPU) costs
about a minute per compiled shape on 2 cores, so one shape runs by default and the rest is `slow`.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from distill import student as student_mod
from distill.augment import FAMILIES
from distill.functional import functional_convnet
from distill.matching import MatchPlan, Student, match_replay
from distill.models import build_model
from distill.params import ParamLayout
from distill.student import EagerSteps, FastSteps, first_call_tolerance
from helpers import DT, matching_problem, rel

def problem(*, group=6, batch=6, steps=3, families=FAMILIES, norm="batch", depth=2, seed=0,
            n=12, classes=3):
    model, dsa, *args = matching_problem(group=group, batch=batch, steps=steps,
                                         families=families, norm=norm, depth=depth, seed=seed,
                                         n=n, classes=classes, iteration=3, student=False)
    return model, dsa, tuple(args)


def students(model, dsa, backend, **fast):
    eager = Student.of(model, dsa, DT, "cpu", compile="off")
    fast_student = Student.of(model, dsa, DT, "cpu", compile="off")
    fast_student.steps = FastSteps(functional_convnet(model), dsa, fast_student.steps,
                                   backend=backend, **fast)
    return eager, fast_student


def assert_same(a, b, tol=1e-10):
    assert rel(a.grad_images, b.grad_images) <= tol
    assert rel(a.grad_lr.reshape(1), b.grad_lr.reshape(1)) <= tol
    assert abs(float(a.loss) - float(b.loss)) <= tol * abs(float(b.loss))
    assert float(b.grad_images.abs().sum()) > 0  # not vacuous


# --------------------------------------------------------------------------------------------
# The functional ConvNet
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
@pytest.mark.parametrize("depth", [1, 2])
def test_functional_convnet_equals_the_module(norm, depth):
    torch.manual_seed(1)
    model = build_model("convnet", in_channels=3, num_classes=5, image_size=8, width=8,
                        depth=depth, norm=norm).to(DT).train()
    net = functional_convnet(model)
    theta = ParamLayout.of(model).flatten(model).detach()
    x = torch.randn(6, 3, 8, 8, dtype=DT)
    with torch.no_grad():
        assert rel(net.forward(theta, x), model(x)) < 1e-13


def test_grouped_batch_norm_is_one_call_per_group():
    torch.manual_seed(2)
    model = build_model("convnet", in_channels=1, num_classes=3, image_size=8, width=4,
                        depth=2).to(DT)
    net = functional_convnet(model)
    theta = ParamLayout.of(model).flatten(model).detach()
    x = torch.randn(9, 1, 8, 8, dtype=DT)
    per_group = torch.cat([net.forward(theta, x[i:i + 3]) for i in (0, 3, 6)])
    assert rel(net.forward(theta, x, groups=3), per_group) < 1e-13
    assert rel(net.forward(theta, x, groups=1), per_group) > 1e-3  # groups change the math


def test_other_networks_keep_the_module_path():
    resnet = build_model("resnet18", in_channels=3, num_classes=10, image_size=32)
    assert functional_convnet(resnet) is None
    assert not student_mod.use_fast_path("on", resnet, torch.device("cpu"))[0]
    convnet = build_model("convnet", in_channels=1, num_classes=3, image_size=8, width=4)
    assert student_mod.use_fast_path("auto", convnet, torch.device("cuda"))[0]
    assert not student_mod.use_fast_path("auto", convnet, torch.device("cpu"))[0]
    with pytest.raises(ValueError, match="distill.compile must be one of"):
        student_mod.use_fast_path("yes", convnet, torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# Fast steps = eager steps (float64)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [6, 3, 2])
def test_fast_path_math_equals_eager_every_family(group):
    """dynamo's full-graph capture of the torch.func steps, run without code generation; the
    augmentation runs outside the captured graph, so one capture serves every family."""
    model, dsa, _ = problem(group=group)
    eager, fast = students(model, dsa, backend="eager")
    for family in FAMILIES + ("none",):
        _, _, args = problem(group=group, families=() if family == "none" else (family,))
        assert_same(match_replay(fast, *args), match_replay(eager, *args))
    assert fast.steps.failed is None


def test_groups_per_call_does_not_change_the_result():
    model, dsa, args = problem(group=2, batch=6)
    eager, fast = students(model, dsa, backend="eager", groups_per_call=2)
    assert_same(match_replay(fast, *args), match_replay(eager, *args))


def test_compiled_fast_path_equals_eager_every_family():
    """Inductor: one compiled shape (|b| = g = 6), every DSA family through it."""
    model, dsa, _ = problem()
    eager, fast = students(model, dsa, backend="inductor")
    for family in FAMILIES:
        _, _, args = problem(families=(family,), seed=3)
        assert_same(match_replay(fast, *args), match_replay(eager, *args))
    assert fast.steps.failed is None and fast.steps.compile_seconds > 0


@pytest.mark.slow
@pytest.mark.parametrize("group,per_call", [(3, None), (2, 1)])
def test_compiled_fast_path_with_groups_equals_eager(group, per_call):
    model, dsa, args = problem(group=group)
    eager, fast = students(model, dsa, backend="inductor", groups_per_call=per_call)
    assert_same(match_replay(fast, *args), match_replay(eager, *args))
    assert fast.steps.failed is None


# --------------------------------------------------------------------------------------------
# Falling back, never failing
# --------------------------------------------------------------------------------------------


def test_a_compiler_failure_falls_back_to_eager(caplog):
    model, dsa, args = problem()
    eager, fast = students(model, dsa, backend="eager")

    def broken(*a, **k):
        raise RuntimeError("backend exploded")

    fast.steps._gradient = broken
    with caplog.at_level(logging.WARNING, logger="distill.student"):
        res = match_replay(fast, *args)
    assert_same(res, match_replay(eager, *args))
    assert "backend exploded" in fast.steps.failed and "eager reference" in caplog.text
    assert fast.steps.name.startswith("eager")


def test_a_wrong_compiled_result_is_caught_and_dropped(caplog):
    model, dsa, args = problem()
    eager, fast = students(model, dsa, backend="eager")
    good = fast.steps._replay
    fast.steps._replay = lambda *a: tuple(t * 1.01 for t in good(*a))  # a 1% miscompile
    with caplog.at_level(logging.WARNING, logger="distill.student"):
        res = match_replay(fast, *args)
    assert_same(res, match_replay(eager, *args))
    assert "differs from the eager reference" in fast.steps.failed


def test_a_three_percent_miscompile_is_caught_in_float32(caplog):
    """float32 has its own tolerance (2e-2 with strict convolutions, first_call_tolerance): a
    result 3% off is dropped, although it is within the TF32 tolerance."""
    model, dsa, *args32 = matching_problem(dtype=torch.float32, iteration=3, student=False)
    fast = Student.of(model, dsa, torch.float32, "cpu", compile="off")
    fast.steps = FastSteps(functional_convnet(model), dsa, fast.steps, backend="eager")
    good = fast.steps._replay
    fast.steps._replay = lambda *a: tuple(t * 1.03 for t in good(*a))
    with caplog.at_level(logging.WARNING, logger="distill.student"):
        match_replay(fast, *args32)
    assert "tolerance 0.02" in fast.steps.failed
    assert first_call_tolerance(torch.float64, torch.device("cpu")) == 1e-8
    assert first_call_tolerance(torch.float32, torch.device("cpu")) == 2e-2


# --------------------------------------------------------------------------------------------
# No host round trips inside the N-step loops
# --------------------------------------------------------------------------------------------


class SyncCounter(TorchDispatchMode):
    """Counts ops that make a CUDA host wait: reading a value (.item, float(), bool()) and
    data-dependent shapes; and copies that change device."""

    SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
               "aten::unique", "aten::_unique2", "aten::is_nonzero")

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.device_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in self.SYNCING:
            self.syncs.append(name)
        if name == "aten::_to_copy" and "device" in kwargs:
            self.device_copies += 1
        return func(*args, **kwargs)


def outside_modes(fn):
    def call(*args):
        with _disable_current_modes():
            return fn(*args)
    return call


@pytest.mark.parametrize("path", ["eager", "fast"])
def test_no_host_sync_inside_the_step_loops(path):
    counts = []
    for steps in (1, 3):
        model, dsa, args = problem(steps=steps, group=3)
        eager, fast = students(model, dsa, backend="eager")
        st = eager if path == "eager" else fast
        match_replay(st, *args)  # compile and check outside the counted run
        if path == "fast":  # a compiled region is one graph (fullgraph=True): count around it
            st.steps._gradient = outside_modes(st.steps._gradient)
            st.steps._replay = outside_modes(st.steps._replay)
        with SyncCounter() as counter:
            match_replay(st, *args)
        counts.append(len(counter.syncs))
    # one read per iteration (the start distance returned as a float), none per step
    assert counts == [1, 1], counts


def test_plan_moves_to_a_device_in_one_copy_per_dtype():
    _, _, (*_, plan) = problem(steps=4)
    dtypes = {s.index.dtype for s in plan.steps} | {v.dtype for s in plan.steps
                                                   for v in s.aug.values.values()}
    with SyncCounter() as counter:
        moved = plan.to("meta")
    assert counter.device_copies == len(dtypes)
    assert isinstance(moved, MatchPlan) and moved.device.type == "meta"
    for a, b in zip(plan.steps, moved.steps):
        assert a.index.shape == b.index.shape and b.index.dtype == a.index.dtype
        assert a.aug.family == b.aug.family
        for k, v in a.aug.values.items():
            assert b.aug.values[k].device.type == "meta" and b.aug.values[k].dtype == v.dtype
    assert plan.to("cpu") is plan


def test_plan_packing_keeps_every_value():
    _, _, (*_, plan) = problem(steps=4, families=("flip", "cutout", "color"))
    plan = MatchPlan(plan.steps + problem(steps=3, families=("flip",), seed=1)[2][-1].steps,
                     plan.group)  # bool, int64 and float32 values side by side
    copy = plan._packed_copy(torch.device("cpu"))
    for a, b in zip(plan.steps, copy.steps, strict=True):
        assert torch.equal(a.index, b.index) and a.aug.family == b.aug.family
        for k, v in a.aug.values.items():
            assert b.aug.values[k].dtype == v.dtype and torch.equal(b.aug.values[k], v)


def test_eager_steps_are_the_default():
    model, dsa, _ = problem()
    assert isinstance(Student.of(model, dsa, DT, "cpu").steps, EagerSteps)
