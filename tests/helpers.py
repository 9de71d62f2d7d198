"""Test problems and helpers shared by the test modules (and the benchmarks' reference).

* :func:`matching_problem`: one matching step of a tiny ConvNet-BN on 8×8 images, in float64 by
  default: (student, start, target, images, labels, lr, plan), the arguments of ``match_replay``;
* :func:`match_unrolled`: the reference algorithm, one graph through all N steps (what the
  MTT/SelMatch code does), against which the replay and the fast path are checked and benchmarked
  (bench/matching_probe.py imports it from here: it is not product API);
* :func:`rel`: relative error of one tensor against another;
* :func:`replaced_step`: run code with ``Distiller.step`` wrapped (to kill or poison a run at an
  iteration).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from distill.augment import DSA, DSAConfig, FAMILIES
from distill.matching import MatchPlan, MatchResult, Share, Student, make_plan
from distill.models import build_model
from distill.params import ParamLayout

DT = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def matching_problem(*, n: int = 12, classes: int = 3, depth: int = 2, norm: str = "batch",
                     steps: int = 3, batch: int = 6, group: int = 6,
                     families: tuple[str, ...] | None = FAMILIES, seed: int = 0,
                     plan_seed: int | None = None, iteration: int = 5, dtype=DT,
                     student: bool = True):
    """A width-4 ConvNet on ``n`` random 8×8 images, target 0.05 from the start, lr 0.3, DSA of
    ``families`` (None or () = no augmentation). With ``student=False`` the model and the DSA
    are returned in place of the student: (model, dsa, start, target, images, labels, lr, plan)."""
    torch.manual_seed(seed)
    model = build_model("convnet", in_channels=1, num_classes=classes, image_size=8, width=4,
                        depth=depth, norm=norm).to(dtype)
    start = ParamLayout.of(model).flatten(model).detach().clone()
    target = start + 0.05 * torch.randn_like(start)
    images = torch.randn(n, 1, 8, 8, dtype=dtype)
    labels = torch.arange(n) % classes
    dsa = DSA(DSAConfig(families=tuple(families))) if families else None
    plan = make_plan(n, batch=batch, steps=steps, group=group, image_size=(8, 8), dsa=dsa,
                     seed=seed if plan_seed is None else plan_seed, iteration=iteration)
    lr = torch.tensor(0.3, dtype=dtype)
    if not student:
        return model, dsa, start, target, images, labels, lr, plan
    return Student.of(model, dsa, dtype, "cpu"), start, target, images, labels, lr, plan


def match_unrolled(student: Student, start: torch.Tensor, target: torch.Tensor,
                   images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
                   plan: MatchPlan) -> MatchResult:
    """The reference algorithm: one graph through all N steps (memory ∝ N·|b|), one process."""
    plan = plan.to(images.device)
    x = images.detach().requires_grad_(True)
    lr_leaf = lr.detach().requires_grad_(True)
    theta = start.detach()
    for step in plan.steps:
        th = theta if theta.requires_grad else theta.requires_grad_(True)
        loss = sum(student.group_loss(th, x[rows], labels[rows], aug, plan.batch)
                   for rows, aug in (Share(gid * plan.group, (gid + 1) * plan.group, None,
                                           plan.group).rows(step)
                                     for gid in range(plan.num_groups)))
        g = torch.autograd.grad(loss, th, create_graph=True)[0]
        theta = th - lr_leaf * g
    denom = (start - target).pow(2).sum()
    loss = (theta - target).pow(2).sum() / denom
    grad_images, grad_lr = torch.autograd.grad(loss, [x, lr_leaf])
    return MatchResult(loss.detach(), grad_images, grad_lr, float(denom))


@contextlib.contextmanager
def replaced_step(wrap: Callable[[Callable, object, int], dict]) -> Iterator[None]:
    """``Distiller.step`` becomes ``wrap(real_step, self, iteration)`` inside the block."""
    from distill.distiller import Distiller

    real = Distiller.step
    Distiller.step = lambda self, it: wrap(real, self, it)
    try:
        yield
    finally:
        Distiller.step = real


def killed_at(iteration: int) -> contextlib.AbstractContextManager:
    """Within the block a distillation raises KeyboardInterrupt as it starts ``iteration``."""
    def wrap(real, self, it):
        if it == iteration:
            raise KeyboardInterrupt("killed")
        return real(self, it)
    return replaced_step(wrap)
