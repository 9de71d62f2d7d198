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

from distill.augment import DSA, DSAParams
from distill.checks import check_team
from distill.rng import MATCH_AUGMENT, MATCH_PLAN
from distill.runtime import SOLO, Team
from distill.student import Student

__all__ = ["LOCAL", "Collectives", "LocalCollectives", "MatchPlan", "MatchResult", "StepPlan",
           "Student", "make_plan", "match_replay", "rank_groups", "rank_share",
           "theta_pair"]

class Collectives(Protocol):
    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def team(self, size: int) -> Team: ...


class LocalCollectives:
    """One process: every reduction is the identity."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def team(self, size: int) -> Team:
        check_team(size, ranks=1)
        return SOLO


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

    @property
    def device(self) -> torch.device:
        return self.steps[0].index.device

    def to(self, device: torch.device | str) -> MatchPlan:
        """The plan on ``device`` in one host-to-device copy per dtype (not one per tensor).

        The N steps' indices and augmentation values are packed into one buffer per dtype,
        copied once (from pinned memory, asynchronously, on CUDA) and cut into views, so the
        N-step loops of the replay index device tensors and never wait for the host.
        """
        device = torch.device(device)
        return self if self.device == device else self._packed_copy(device)

    def _packed_copy(self, device: torch.device) -> MatchPlan:
        tensors = [s.index for s in self.steps] + [v for s in self.steps if s.aug is not None
                                                   for v in s.aug.values.values()]
        moved = {}
        for dtype in {t.dtype for t in tensors}:
            same = [t for t in tensors if t.dtype == dtype]
            packed = torch.cat([t.reshape(-1).view(torch.uint8) if dtype == torch.bool
                                else t.reshape(-1) for t in same])
            if device.type == "cuda":
                packed = packed.pin_memory()
            packed = packed.to(device, non_blocking=True)
            parts = packed.split([t.numel() for t in same])
            for t, part in zip(same, parts):
                part = part.view(torch.bool) if dtype == torch.bool else part
                moved[id(t)] = part.view(t.shape)
        steps = tuple(StepPlan(moved[id(s.index)], None if s.aug is None else DSAParams(
            s.aug.family, {k: moved[id(v)] for k, v in s.aug.values.items()}))
            for s in self.steps)
        return MatchPlan(steps, self.group)


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
    gen = MATCH_PLAN.generator(seed, iteration)
    needed = steps * batch
    perms = [torch.randperm(n_images, generator=gen) for _ in range(-(-needed // n_images))]
    stream = torch.cat(perms)[:needed]
    plan = []
    for k in range(steps):
        aug = None
        if dsa is not None:
            aug = dsa.sample(batch, image_size, MATCH_AUGMENT.generator(seed, iteration, k))
        plan.append(StepPlan(stream[k * batch:(k + 1) * batch], aug))
    return MatchPlan(tuple(plan), group)


def rank_groups(num_groups: int, rank: int, world_size: int) -> range:
    """Contiguous block of group ids owned by ``rank`` (blocks differ in size by at most one)."""
    base, extra = divmod(num_groups, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


# --------------------------------------------------------------------------------------------
# Matching with replay
# --------------------------------------------------------------------------------------------


@dataclass
class MatchResult:
    loss: torch.Tensor          # scalar, detached
    grad_images: torch.Tensor   # [n, ...] ∂L/∂X for every row (callers keep the learnable rows)
    grad_lr: torch.Tensor       # scalar ∂L/∂lr
    start_distance: float       # ‖θ*_t − θ*_{t+M}‖²


@dataclass(frozen=True)
class Share:
    """Which positions of every step's batch this rank computes, and how they form BN groups:
    whole groups ``[lo, hi)``, or (a BN group spread over a team of ranks) this member's slice
    of each of its team's groups, at ``positions``."""

    lo: int
    hi: int
    positions: torch.Tensor | None
    group_rows: int                 # rows of one BN group held by this rank

    @property
    def empty(self) -> bool:
        return self.hi == self.lo if self.positions is None else self.positions.numel() == 0

    def rows(self, step: StepPlan) -> tuple[torch.Tensor, DSAParams | None]:
        if self.positions is None:
            aug = step.aug.slice(self.lo, self.hi) if step.aug is not None else None
            return step.index[self.lo:self.hi], aug
        aug = step.aug.take(self.positions) if step.aug is not None else None
        return step.index.index_select(0, self.positions), aug


def rank_share(plan: MatchPlan, rank: int, world_size: int, team_size: int = 1,
               device: torch.device | str = "cpu") -> Share:
    """This rank's share of every step: teams of ``team_size`` consecutive ranks divide the BN
    groups among themselves (:func:`rank_groups`), and the members of a team divide every group
    of their team into equal consecutive slices."""
    check_team(team_size, group=plan.group, ranks=world_size)
    groups = rank_groups(plan.num_groups, rank // team_size, world_size // team_size)
    if team_size == 1:
        return Share(groups.start * plan.group, groups.stop * plan.group, None, plan.group)
    part = plan.group // team_size
    starts = torch.arange(groups.start, groups.stop, device=device) * plan.group
    starts = starts + (rank % team_size) * part
    positions = (starts[:, None] + torch.arange(part, device=device)).reshape(-1)
    return Share(0, 0, positions, part)


def match_replay(student: Student, start: torch.Tensor, target: torch.Tensor,
                 images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor, plan: MatchPlan,
                 *, comm: Collectives = LOCAL) -> MatchResult:
    """Loss and exact gradients w.r.t. ``images`` and ``lr`` with memory independent of N.

    The per-step work is ``student.steps`` (eager reference or compiled); this function owns the
    order of the steps and the collectives. Nothing inside the two N-step loops copies between
    host and device: the plan is moved to the images' device once, up front.
    """
    images, lr_value = images.detach(), lr.detach()
    plan = plan.to(images.device)
    steps, b = student.steps, plan.batch
    share = rank_share(plan, comm.rank, comm.world_size, getattr(steps, "team", SOLO).size,
                       images.device)
    g = share.group_rows

    # forward: keep θ_0 … θ_N only
    thetas = [start.detach()]
    for step in plan.steps:
        grad = torch.zeros_like(thetas[-1])
        if not share.empty:
            rows, aug = share.rows(step)
            grad = steps.gradient(thetas[-1], images[rows], labels[rows], aug, group=g, batch=b)
        thetas.append(thetas[-1] - lr_value * comm.all_reduce_sum(grad))
    denom = (start - target).pow(2).sum()
    diff = thetas[-1] - target
    loss = diff.pow(2).sum() / denom

    # backward: replay step k from θ_k, VJP with the adjoint λ = ∂L/∂θ_{k+1}
    lam = 2.0 * diff / denom
    grad_images = torch.zeros_like(images)
    grad_lr = torch.zeros((), dtype=images.dtype, device=images.device)
    for k in range(len(plan.steps) - 1, -1, -1):
        h_lam = torch.zeros_like(lam)
        if not share.empty:
            rows, aug = share.rows(plan.steps[k])
            h_lam, grad_x, g_dot_lam = steps.replay(thetas[k], images[rows], labels[rows], aug,
                                                    lam, group=g, batch=b)
            grad_images.index_add_(0, rows, grad_x)
            grad_lr -= g_dot_lam
        lam = lam - lr_value * comm.all_reduce_sum(h_lam)
        del thetas[k + 1]  # θ_{k+1} is no longer needed
    grad_images = comm.all_reduce_sum(grad_images) * (-lr_value)
    grad_lr = comm.all_reduce_sum(grad_lr)
    return MatchResult(loss.detach(), grad_images, grad_lr, float(denom))


def theta_pair(trajectory: torch.Tensor, start_epoch: int, expert_epochs: int,
               dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ*_t, θ*_{t+M}) from an expert's ``[E+1, P]`` trajectory."""
    if start_epoch + expert_epochs >= len(trajectory):
        raise ValueError(f"start epoch {start_epoch} + M {expert_epochs} is beyond the expert's "
                         f"{len(trajectory) - 1} epochs")
    return (trajectory[start_epoch].to(device, dtype),
            trajectory[start_epoch + expert_epochs].to(device, dtype))
