"""Trajectory-matching loss (MTT, SelMatch eq. 1) and its exact gradient by step-wise replay.

The student starts at an expert's θ*_t and takes N SGD steps on minibatches of the synthetic set:
θ_{k+1} = θ_k − lr·g_k, g_k = ∇_θ ℓ(θ_k; aug_k(X[b_k])). The loss is
L = ‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖².

**Replay instead of a full unroll.** Keeping the graph of all N steps (what the reference code
does) costs activation memory ∝ N·|b|. Here the forward pass keeps only the N+1 parameter vectors;
the backward pass walks k = N−1 … 0, rebuilds step k's graph from θ_k alone (create_graph=True)
and takes the vector-Jacobian product of θ_{k+1} = θ_k − lr·g_k with the adjoint λ = ∂L/∂θ_{k+1}:

    ∂L/∂θ_k  = λ − lr · H_k λ          (H_k λ = ∂(g_k·λ)/∂θ_k)
    ∂L/∂X   += −lr · ∂(g_k·λ)/∂X
    ∂L/∂lr  += −g_k·λ

This is reverse-mode differentiation of the same computation, so it is exact (tests compare it with
a full unroll in float64); only one BN group's graph is alive at any time.

**BN groups make the math independent of how the work is split.** A step's |b| rows are cut into
|b|/g consecutive groups, each normalised with its own batch statistics; the step loss is
Σ_groups CE_sum(group) / |b|. Groups are processed one after another, and with R ranks each rank
takes a contiguous block of groups; the per-step gradient and the adjoint contributions are summed
with ``comm.all_reduce_sum``, the image and lr gradients once at the end. The result is the same
for any R and any grouping of work, up to float summation order.

Randomness lives in the :class:`MatchPlan`: batch indices and augmentation parameters per step,
derived from (run seed, iteration, step), so the replay re-applies exactly the forward transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from distill.augment import DSA, DSAParams, make_generator
from distill.models import ParamLayout, functional_forward

_PLAN, _AUG = 31, 32  # generator stream tags


class Collectives(Protocol):
    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


class LocalCollectives:
    """One process: every reduction is the identity."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


LOCAL = LocalCollectives()


# --------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    index: torch.Tensor            # long [|b|]: rows of the synthetic set
    aug: DSAParams | None          # augmentation of the whole |b| batch (sliced per group)


@dataclass(frozen=True)
class MatchPlan:
    steps: tuple[StepPlan, ...]
    group: int                     # g: rows normalised together

    @property
    def batch(self) -> int:
        return len(self.steps[0].index)

    @property
    def num_groups(self) -> int:
        return self.batch // self.group


def make_plan(n_images: int, *, batch: int, steps: int, group: int, image_size: tuple[int, int],
              dsa: DSA | None, seed: int, iteration: int) -> MatchPlan:
    """Batches drawn without replacement from successive random permutations of the set.

    Every step gets exactly ``batch`` rows: the stream of indices is the concatenation of fresh
    permutations, cut into consecutive chunks, so the whole set is cycled through before any row
    repeats (a chunk spanning two permutations may hold a row twice).
    """
    if batch > n_images:
        raise ValueError(f"batch {batch} exceeds the synthetic set size {n_images}")
    if batch % group:
        raise ValueError(f"BN group {group} must divide the batch {batch}")
    gen = make_generator(seed, _PLAN, iteration)
    needed = steps * batch
    perms = [torch.randperm(n_images, generator=gen) for _ in range(-(-needed // n_images))]
    stream = torch.cat(perms)[:needed]
    plan = []
    for k in range(steps):
        aug = None
        if dsa is not None:
            aug = dsa.sample(batch, image_size, make_generator(seed, _AUG, iteration, k))
        plan.append(StepPlan(stream[k * batch:(k + 1) * batch], aug))
    return MatchPlan(tuple(plan), group)


def rank_groups(num_groups: int, rank: int, world_size: int) -> range:
    """Contiguous block of group ids owned by ``rank`` (blocks differ in size by at most one)."""
    base, extra = divmod(num_groups, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# --------------------------------------------------------------------------------------------
# The step's loss on one group
# --------------------------------------------------------------------------------------------


@dataclass
class Student:
    """The network whose functional form is unrolled, with detached buffers of the right dtype."""

    model: torch.nn.Module
    layout: ParamLayout
    dsa: DSA | None
    buffers: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: torch.nn.Module, dsa: DSA | None, dtype: torch.dtype,
           device: torch.device | str) -> Student:
        model.train()  # BN uses batch statistics: they are part of the matched computation
        buffers = {name: b.detach().to(device, dtype if b.is_floating_point() else b.dtype).clone()
                   for name, b in model.named_buffers()}
        return cls(model, ParamLayout.of(model), dsa, buffers)

    def group_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   aug: DSAParams | None, batch: int) -> torch.Tensor:
        """CE summed over the group's rows / |b| (so group losses add up to the step loss)."""
        if aug is not None and self.dsa is not None:
            x = self.dsa.apply(x, aug)
        out = functional_forward(self.model, theta, x, self.layout, buffers=self.buffers)
        return F.cross_entropy(out, y, reduction="sum") / batch


def _group_rows(step: StepPlan, gid: int, g: int,
                device: torch.device) -> tuple[torch.Tensor, DSAParams | None]:
    """Rows (on the images' device: plans are drawn on the CPU) and augmentation of one group."""
    lo, hi = gid * g, (gid + 1) * g
    return step.index[lo:hi].to(device), (step.aug.slice(lo, hi) if step.aug is not None else None)


# --------------------------------------------------------------------------------------------
# Matching with replay
# --------------------------------------------------------------------------------------------


@dataclass
class MatchResult:
    loss: torch.Tensor          # scalar, detached
    grad_images: torch.Tensor   # [n, ...] ∂L/∂X for every row (callers keep the learnable rows)
    grad_lr: torch.Tensor       # scalar ∂L/∂lr
    start_distance: float       # ‖θ*_t − θ*_{t+M}‖²


def _step_gradient(student: Student, theta: torch.Tensor, images: torch.Tensor,
                   labels: torch.Tensor, step: StepPlan, plan: MatchPlan, groups: range,
                   comm: Collectives) -> torch.Tensor:
    """g_k summed over this rank's groups, then over ranks (no graph kept)."""
    grad = torch.zeros_like(theta)
    for gid in groups:
        rows, aug = _group_rows(step, gid, plan.group, images.device)
        th = theta.detach().requires_grad_(True)
        loss = student.group_loss(th, images[rows], labels[rows], aug, plan.batch)
        grad += torch.autograd.grad(loss, th)[0]
    return comm.all_reduce_sum(grad)


def match_replay(student: Student, start: torch.Tensor, target: torch.Tensor,
                 images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, plan: MatchPlan,
                 *, comm: Collectives = LOCAL, images_grad: bool = True) -> MatchResult:
    """Loss and exact gradients w.r.t. ``images`` and ``lr`` with memory independent of N."""
    images, lr_value = images.detach(), lr.detach()
    groups = rank_groups(plan.num_groups, comm.rank, comm.world_size)

    # forward: keep θ_0 … θ_N only
    thetas = [start.detach()]
    for step in plan.steps:
        g = _step_gradient(student, thetas[-1], images, labels, step, plan, groups, comm)
        thetas.append(thetas[-1] - lr_value * g)
    denom = (start - target).pow(2).sum()
    diff = thetas[-1] - target
    loss = diff.pow(2).sum() / denom

    # backward: replay step k from θ_k, VJP with the adjoint λ = ∂L/∂θ_{k+1}
    lam = 2.0 * diff / denom
    grad_images = torch.zeros_like(images)
    grad_lr = torch.zeros((), dtype=images.dtype, device=images.device)
    for k in range(len(plan.steps) - 1, -1, -1):
        step = plan.steps[k]
        th = thetas[k].detach().requires_grad_(True)
        h_lam = torch.zeros_like(th)
        for gid in groups:
            rows, aug = _group_rows(step, gid, plan.group, images.device)
            xb = images[rows].requires_grad_(images_grad)
            loss_g = student.group_loss(th, xb, labels[rows], aug, plan.batch)
            g = torch.autograd.grad(loss_g, th, create_graph=True)[0]
            g_dot_lam = (g * lam).sum()
            wrt = [th, xb] if images_grad else [th]
            parts = torch.autograd.grad(g_dot_lam, wrt)
            h_lam += parts[0]
            if images_grad:
                grad_images.index_add_(0, rows, parts[1])
            grad_lr -= g_dot_lam.detach()
        lam = lam - lr_value * comm.all_reduce_sum(h_lam)
        del thetas[k + 1]  # θ_{k+1} is no longer needed
    grad_images = comm.all_reduce_sum(grad_images) * (-lr_value)
    grad_lr = comm.all_reduce_sum(grad_lr)
    return MatchResult(loss.detach(), grad_images, grad_lr, float(denom))


def match_unrolled(student: Student, start: torch.Tensor, target: torch.Tensor,
                   images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
                   plan: MatchPlan) -> MatchResult:
    """The reference algorithm: one graph through all N steps (memory ∝ N·|b|).

    Kept for benchmarks (bench/matching.py) and as a second implementation; single process.
    """
    x = images.detach().requires_grad_(True)
    lr_leaf = lr.detach().requires_grad_(True)
    theta = start.detach()
    for step in plan.steps:
        th = theta if theta.requires_grad else theta.requires_grad_(True)
        loss = sum(student.group_loss(th, x[rows], labels[rows], aug, plan.batch)
                   for rows, aug in (_group_rows(step, gid, plan.group, x.device)
                                     for gid in range(plan.num_groups)))
        g = torch.autograd.grad(loss, th, create_graph=True)[0]
        theta = th - lr_leaf * g
    denom = (start - target).pow(2).sum()
    loss = (theta - target).pow(2).sum() / denom
    grad_images, grad_lr = torch.autograd.grad(loss, [x, lr_leaf])
    return MatchResult(loss.detach(), grad_images, grad_lr, float(denom))


def theta_pair(trajectory: torch.Tensor, start_epoch: int, expert_epochs: int,
               dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ*_t, θ*_{t+M}) from an expert's ``[E+1, P]`` trajectory."""
    if start_epoch + expert_epochs >= len(trajectory):
        raise ValueError(f"start epoch {start_epoch} + M {expert_epochs} is beyond the expert's "
                         f"{len(trajectory) - 1} epochs")
    return (trajectory[start_epoch].to(device, dtype),
            trajectory[start_epoch + expert_epochs].to(device, dtype))
