"""The student network of the matching step and the two ways its inner steps are computed.

The replay (distill/matching.py) needs two per-step functions on the rows one rank owns in a step
(G BN groups of g rows, images ``x`` *before* augmentation, the step's augmentation ``aug``):

* ``gradient``: g_k = Σ_groups ∇θ CE_sum(f(θ, aug(x_group)), y_group) / |b|;
* ``replay``: for the adjoint λ, the Hessian-vector product H_k·λ = ∂(g_k·λ)/∂θ, the image term
  ∂(g_k·λ)/∂x and the scalar g_k·λ.

Two implementations compute exactly the same mathematics:

* :class:`EagerSteps`, the reference: the module-based forward (``torch.func.functional_call``)
  and ``torch.autograd.grad(create_graph=True)``, one BN group at a time. It works for every
  network in the model registry.
* :class:`FastSteps`: the ConvNet written as a pure function of the flat θ
  (:mod:`distill.functional`), its second-order step expressed with ``torch.func`` (reverse over
  reverse: ``grad`` of ⟨``grad`` ℓ, λ⟩ with respect to θ and x), compiled by ``torch.compile``
  (Inductor fuses batch norm's chains of small elementwise ops) and, on CUDA, replayed as CUDA
  graphs (``mode="reduce-overhead"``: one launch per step instead of hundreds). A rank's BN
  groups go through one call (``groups_per_call`` caps it). DSA stays outside the compiled region:
  it is linear in the images, so its vector-Jacobian product is cheap, and kornia's warps have no
  forward-mode derivative. Forward over reverse (``jvp`` of ``grad``) computes the same thing;
  compiled, it took 1.19x the CPU time per call on this project's CPU machine
  (bench/results/fast_path_variants_cpu.md; not yet measured on a GPU), so it is not kept.

A fast path that fails to compile, or whose first result for a new shape disagrees with the
reference, is abandoned for the eager one with a warning: a torch version without the features it
needs costs speed, never a crash or a wrong result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from distill.augment import DSA, DSAParams
from distill.functional import FunctionalConvNet, functional_convnet
from distill.params import ParamLayout, functional_forward, step_loss

log = logging.getLogger(__name__)

COMPILE_CHOICES = ("auto", "on", "off")
PRECISIONS = ("auto", "tf32", "fp32")


BACKEND = "inductor"
"""torch.compile's backend for the fast path (a parameter of :meth:`Student.of` and
:class:`FastSteps`; the product always uses this one)."""


class Steps(Protocol):
    """The two per-step functions of the replay (see the module docstring)."""

    name: str

    def gradient(self, theta: Tensor, x: Tensor, y: Tensor, aug: DSAParams | None, *,
                 group: int, batch: int) -> Tensor: ...

    def replay(self, theta: Tensor, x: Tensor, y: Tensor, aug: DSAParams | None, lam: Tensor, *,
               group: int, batch: int) -> tuple[Tensor, Tensor, Tensor]: ...


# --------------------------------------------------------------------------------------------
# The student and the reference (eager) steps
# --------------------------------------------------------------------------------------------


@dataclass
class Student:
    """The network whose functional form is unrolled, with detached buffers of the right dtype,
    and the :class:`Steps` that compute its inner steps."""

    model: torch.nn.Module
    layout: ParamLayout
    dsa: DSA | None
    buffers: dict[str, Tensor]
    steps: Steps = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.steps = EagerSteps(self)

    @classmethod
    def of(cls, model: torch.nn.Module, dsa: DSA | None, dtype: torch.dtype,
           device: torch.device | str, *, compile: str | bool = "off", cuda_graphs: bool = True,
           groups_per_call: int | None = None, team=None,
           backend: str = BACKEND) -> Student:
        """``compile``: off = the eager reference; on = the fast path (falls back to eager with a
        warning where it cannot run); auto = on for CUDA, off on CPU (see :func:`use_fast_path`).
        ``team``: a :class:`~distill.runtime.Team` of more than one rank spreads every BN group
        over its ranks (:class:`TeamSteps`). ``backend``: torch.compile's backend for the fast
        path (inductor; "eager" captures the same graph without generating code, in seconds)."""
        model.train()  # BN uses batch statistics: they are part of the matched computation
        buffers = {name: b.detach().to(device, dtype if b.is_floating_point() else b.dtype).clone()
                   for name, b in model.named_buffers()}
        student = cls(model, ParamLayout.of(model), dsa, buffers)
        size = team.size if team is not None else 1
        fast, why = use_fast_path(compile, model, torch.device(device), size)
        if size > 1:
            net = functional_convnet(model)
            if net is None:
                raise ValueError(f"distill.group_ranks ({team.size}) spreads BN groups over "
                                 f"ranks with the functional ConvNet; {type(model).__name__} "
                                 f"has no functional form: use distill.group_ranks: 1")
            student.steps = TeamSteps(net, dsa, team)
        elif fast:
            student.steps = FastSteps(functional_convnet(model), dsa, student.steps,
                                      cuda_graphs=cuda_graphs and torch.device(device).type == "cuda",
                                      groups_per_call=groups_per_call, backend=backend)
        log.info("matching step: %s (%s)", student.steps.name, why)
        return student

    def group_loss(self, theta: Tensor, x: Tensor, y: Tensor, aug: DSAParams | None,
                   batch: int) -> Tensor:
        """CE summed over the group's rows / |b| (so group losses add up to the step loss)."""
        if aug is not None and self.dsa is not None:
            x = self.dsa.apply(x, aug)
        out = functional_forward(self.model, theta, x, self.layout, buffers=self.buffers)
        return step_loss(out, y, batch)


def compile_choice(value: str | bool) -> str:
    """``distill.compile`` as one of COMPILE_CHOICES: YAML 1.1 reads a bare on/off as a boolean."""
    choice = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"distill.compile must be one of {', '.join(COMPILE_CHOICES)}; "
                         f"got {value!r}")
    return choice


def use_fast_path(choice: str | bool, model: torch.nn.Module, device: torch.device,
                  group_ranks: int = 1) -> tuple[bool, str]:
    """Whether the compiled path runs, and why (one log line): the one rule, which the
    distiller and the estimate both ask."""
    choice = compile_choice(choice)
    if group_ranks > 1:
        return False, f"distill.group_ranks {group_ranks}: cross-rank BN statistics run uncompiled"
    if choice == "off":
        return False, "distill.compile: off"
    if functional_convnet(model) is None:
        return False, (f"the compiled path covers the ConvNet student only, not "
                       f"{type(model).__name__}")
    if choice == "on":
        return True, "distill.compile: on"
    if device.type != "cuda":
        return False, ("distill.compile: auto compiles on CUDA only: on CPU compiling takes "
                       "about a minute per kernel, more than short CPU runs save "
                       "(distill.compile: on to force it)")
    return True, "distill.compile: auto on CUDA"


def _slices(total: int, size: int):
    for lo in range(0, total, size):
        yield lo, min(lo + size, total)


def _aug_slice(aug: DSAParams | None, lo: int, hi: int) -> DSAParams | None:
    return None if aug is None else aug.slice(lo, hi)


class EagerSteps:
    """The reference: autograd through the module-based forward, one BN group at a time."""

    name = "eager reference"

    def __init__(self, student: Student):
        self.student = student

    def gradient(self, theta, x, y, aug, *, group, batch):
        grad = torch.zeros_like(theta)
        for lo, hi in _slices(len(x), group):
            th = theta.detach().requires_grad_(True)
            loss = self.student.group_loss(th, x[lo:hi], y[lo:hi], _aug_slice(aug, lo, hi), batch)
            grad += torch.autograd.grad(loss, th)[0]
        return grad

    def replay(self, theta, x, y, aug, lam, *, group, batch):
        th = theta.detach().requires_grad_(True)
        h_lam = torch.zeros_like(theta)
        g_dot_lam = torch.zeros((), dtype=theta.dtype, device=theta.device)
        grad_x = torch.zeros_like(x)
        for lo, hi in _slices(len(x), group):
            xb = x[lo:hi].detach().requires_grad_(True)
            loss = self.student.group_loss(th, xb, y[lo:hi], _aug_slice(aug, lo, hi), batch)
            h, gx, dot = _replay_by_double_backward(loss, th, xb, lam)
            h_lam += h
            grad_x[lo:hi] = gx
            g_dot_lam += dot
        return h_lam, grad_x, g_dot_lam


def _replay_by_double_backward(loss: Tensor, th: Tensor, xb: Tensor,
                               lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(H·λ, ∂(g·λ)/∂x, g·λ) for g = ∇θ ``loss``, by autograd's double backward (the eager
    reference and the team steps)."""
    g = torch.autograd.grad(loss, th, create_graph=True)[0]
    dot = (g * lam).sum()
    h, gx = torch.autograd.grad(dot, [th, xb])
    return h, gx, dot.detach()


# --------------------------------------------------------------------------------------------
# The fast path
# --------------------------------------------------------------------------------------------


def _kernels(net: FunctionalConvNet):
    """The two pure step functions of ``net``, ready for ``torch.compile``."""

    def loss(theta, x, y, groups, batch):
        return step_loss(net.forward(theta, x, groups), y, batch)

    def gradient(theta, x, y, groups, batch):
        return torch.func.grad(loss)(theta, x, y, groups, batch)

    def replay(theta, x, y, lam, groups, batch):
        def dot(th, xx):
            d = (torch.func.grad(loss)(th, xx, y, groups, batch) * lam).sum()
            return d, d

        (h_lam, grad_x), d = torch.func.grad(dot, argnums=(0, 1), has_aux=True)(theta, x)
        return h_lam, grad_x, d

    return gradient, replay


def first_call_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """How far a compiled step's first result may be from the eager one's (relative) before the
    compiled path is dropped. float64: 1e-8 (both are exact to ~1e-15). float32 with strict
    convolutions: 2e-2; one step's two roundings differ by ~3e-6 typically, and (likely) a one-ulp
    difference that flips a ReLU or a max-pool choice moves it to 7.6e-3 (the largest of the
    Fashion-MNIST comparison's 62 first calls, bench/results/fmnist_cpu.md), while a wrong term or
    sign differs by O(1). TF32 convolutions on CUDA round to 10 mantissa bits: 5e-2."""
    if dtype == torch.float64:
        return 1e-8
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return 5e-2 if tf32 else 2e-2


def _allow_recompiles(limit: int = 64) -> None:
    """Every Distiller in a process (α trials, seeds, methods) compiles the same two functions
    for its own shapes; dynamo's default limit of 8 variants per function would silently drop
    later ones to uncompiled code."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name, limit) < limit:
        setattr(cfg, name, limit)


def _relative_error(got: Tensor, ref: Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


class FastSteps:
    """Compiled ``torch.func`` steps of the functional ConvNet; see the module docstring.

    The first call for each input shape compiles (logged with its duration) and is checked
    against the eager reference on the same inputs (with CUDA graphs, the first replayed call
    too); any failure or disagreement switches this
    object to the eager steps for the rest of the run, with a warning.
    """

    def __init__(self, net: FunctionalConvNet, dsa: DSA | None, reference: EagerSteps, *,
                 cuda_graphs: bool = False, groups_per_call: int | None = None,
                 backend: str = BACKEND):
        self.dsa, self.reference = dsa, reference
        self.groups_per_call = groups_per_call
        self.cuda_graphs = cuda_graphs
        self.backend = backend
        gradient, replay = _kernels(net)
        mode = "reduce-overhead" if cuda_graphs else None
        options = {"backend": self.backend, "fullgraph": True, "dynamic": False}
        if self.backend == "inductor":
            options["mode"] = mode
        _allow_recompiles()
        self._gradient = torch.compile(gradient, **options)
        self._replay = torch.compile(replay, **options)
        self._calls: dict[tuple, int] = {}
        self.failed: str | None = None
        self.compile_seconds = 0.0

    @property
    def name(self) -> str:
        if self.failed:
            return "eager (compiled path failed)"
        backend = "" if self.backend == "inductor" else f" ({self.backend} backend)"
        return "compiled" + backend + (" + CUDA graphs" if self.cuda_graphs else "")

    # -- the two step functions --------------------------------------------------------------

    def gradient(self, theta, x, y, aug, *, group, batch):
        if self.failed:
            return self.reference.gradient(theta, x, y, aug, group=group, batch=batch)
        key = ("gradient", tuple(x.shape), group, batch, x.dtype)
        return self._first_call_checked(
            key, lambda: self._fast_gradient(theta, x, y, aug, group, batch),
            lambda: self.reference.gradient(theta, x, y, aug, group=group, batch=batch))

    def replay(self, theta, x, y, aug, lam, *, group, batch):
        if self.failed:
            return self.reference.replay(theta, x, y, aug, lam, group=group, batch=batch)
        key = ("replay", tuple(x.shape), group, batch, x.dtype)
        return self._first_call_checked(
            key, lambda: self._fast_replay(theta, x, y, aug, lam, group, batch),
            lambda: self.reference.replay(theta, x, y, aug, lam, group=group, batch=batch))

    def _chunks(self, rows: int, group: int):
        per_call = (self.groups_per_call or rows // group) * group
        return _slices(rows, per_call)

    def _call(self, fn, *args):
        if self.cuda_graphs:  # outputs of the previous replay may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*args)

    def _fast_gradient(self, theta, x, y, aug, group, batch):
        total = torch.zeros_like(theta)
        theta = theta.detach()
        for lo, hi in self._chunks(len(x), group):
            with torch.no_grad():
                xa = x[lo:hi] if aug is None else self.dsa.apply(x[lo:hi], aug.slice(lo, hi))
            total += self._call(self._gradient, theta, xa, y[lo:hi], (hi - lo) // group, batch)
        return total

    def _fast_replay(self, theta, x, y, aug, lam, group, batch):
        theta, lam = theta.detach(), lam.detach()
        h_lam = torch.zeros_like(theta)
        g_dot_lam = torch.zeros((), dtype=theta.dtype, device=theta.device)
        grad_x = torch.zeros_like(x)
        for lo, hi in self._chunks(len(x), group):
            xc = x[lo:hi].detach()
            if aug is None:
                xa = xc
            else:  # keep the (linear) augmentation's graph for its vector-Jacobian product
                xc.requires_grad_(True)
                with torch.enable_grad():
                    xa = self.dsa.apply(xc, aug.slice(lo, hi))
            h, gxa, d = self._call(self._replay, theta, xa.detach(), y[lo:hi], lam,
                                   (hi - lo) // group, batch)
            h_lam += h
            g_dot_lam += d
            grad_x[lo:hi] = gxa if aug is None else torch.autograd.grad(xa, xc, gxa)[0]
        return h_lam, grad_x, g_dot_lam

    # -- first call: compile, time, check ----------------------------------------------------

    def _first_call_checked(self, key: tuple, fast, eager):
        calls = self._calls[key] = self._calls.get(key, 0) + 1
        # CUDA graphs: call 1 compiles and warms up, call 2 records, call 3 replays the graph
        if calls not in ((1, 3) if self.cuda_graphs else (1,)):
            return fast()
        t0 = time.perf_counter()
        try:
            got = fast()
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eager
            return self._give_up(f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                                 eager)
        seconds = time.perf_counter() - t0
        if calls == 1:
            self.compile_seconds += seconds
        ref = eager()
        worst = max(_relative_error(a, b) for a, b in zip(_as_tuple(got), _as_tuple(ref))
                    if a is not None)
        tolerance = first_call_tolerance(key[-1], _as_tuple(got)[0].device)
        if not worst <= tolerance:
            return self._give_up(f"its first {key[0]} for shape {key[1]} differs from the eager "
                                 f"reference by {worst:.2e} relative (tolerance {tolerance:g})",
                                 lambda: ref)
        if calls == 1:
            log.info("compiled the %s step for rows %s in %.1f s (%s; result within %.1e of "
                     "eager)", key[0], key[1], seconds, self.name, worst)
        return got

    def _give_up(self, why: str, eager):
        self.failed = why
        log.warning("compiled matching step unavailable (%s); running the eager reference "
                    "path instead, which is slower but exact", why)
        return eager()


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


# --------------------------------------------------------------------------------------------
# One BN group spread over several ranks
# --------------------------------------------------------------------------------------------


class TeamSteps:
    """The functional ConvNet with batch-norm statistics summed over a :class:`Team` of ranks,
    each holding ``g / team.size`` rows of every BN group; plain autograd (the team's
    differentiable all-reduce is an ``autograd.Function``, which ``torch.func`` and the
    compiled path do not take). The result equals one rank holding whole groups (tested in
    float64); the collectives per pass are counted in docs/distributed.md.
    """

    def __init__(self, net: FunctionalConvNet, dsa: DSA | None, team):
        self.net, self.dsa, self.team = net, dsa, team
        self.name = f"eager functional, each BN group over {team.size} ranks"

    def _loss(self, theta, x, y, aug, group, batch):
        if aug is not None:
            x = self.dsa.apply(x, aug)
        out = self.net.forward(theta, x, len(x) // group, team=self.team)
        return step_loss(out, y, batch)

    def gradient(self, theta, x, y, aug, *, group, batch):
        th = theta.detach().requires_grad_(True)
        return torch.autograd.grad(self._loss(th, x, y, aug, group, batch), th)[0]

    def replay(self, theta, x, y, aug, lam, *, group, batch):
        th = theta.detach().requires_grad_(True)
        xb = x.detach().requires_grad_(True)
        return _replay_by_double_backward(self._loss(th, xb, y, aug, group, batch), th, xb, lam)


# --------------------------------------------------------------------------------------------
# Precision of the step's float32 convolutions
# --------------------------------------------------------------------------------------------


def set_precision(choice: str, device: torch.device) -> str:
    """Set cuDNN's TF32 switch for the matching step; returns the precision in effect.

    tf32 is PyTorch's own default for convolutions (``torch.backends.cudnn.allow_tf32 = True``)
    and what the reference MTT/SelMatch code ran with; fp32 is strict IEEE float32. Matrix
    multiplies stay strict in both (PyTorch's default; the classifier is tiny). On CUDA
    ``cudnn.benchmark`` is switched on, as the reference does. On CPU there is no TF32: fp32.
    """
    if choice not in PRECISIONS:
        raise ValueError(f"distill.precision must be one of {', '.join(PRECISIONS)}; "
                         f"got {choice!r}")
    if device.type != "cuda":
        return "fp32"
    resolved = "tf32" if choice == "auto" else choice
    torch.backends.cudnn.allow_tf32 = resolved == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    return resolved
