"""The matching step's resources, modelled: memory per rank, storage, communication and FLOPs
(distill/preflight.py turns them into ``selmatch estimate``'s report and the one-line summary).

The replay (distill/matching.py) keeps one call's graph alive at a time, so the peak memory of
a rank is a sum of terms that can be written down:

    activations      c_act · r · A · s        one call's double-backward graph, r rows
    θ_0 … θ_N        (N + 1) · P · s          the stored parameter vectors
    other P vectors  c_P · P · s              θ*_{t+M}, λ, H·λ, the step gradient, the weights
    synthetic set    n · D · s (+ n · D · s)  the set (+ the copy matched in joint mode)
    image gradient   n_m · D · s              ∂L/∂X for every matched row
    learnable rows   2 · n_d · D · s          their .grad and SGD momentum
    runtime          a constant per device    (library workspaces, lazily loaded kernels)

with r the rows of one call (the eager path: one BN group, g; the compiled path: all the
rank's groups, or ``distill.groups_per_call`` of them; a group spread over T ranks by
``distill.group_ranks``: the rank's g/T share of each of its team's groups), N the student steps,
P the student's parameters, A the number of elements
its convolutions output per sample, D = C·H·W, n the synthetic set, n_m the matched rows, n_d the
learnable rows and s the dtype size (4 bytes). Only c_act, c_P and the runtime constant are not
read off the code; they live in :data:`COEFFICIENTS`. The FLOPs are not modelled: they are
counted by running one group's step and replay step on the meta device under PyTorch's
``FlopCounterMode`` (instant, exact for the convolutions and matmuls of this code).

Not counted: the CUDA context (a few hundred MiB outside PyTorch's allocator), which
``distill.preflight.HEADROOM`` leaves room for, and on CPU the interpreter, the loaded dataset
and the expert-trajectory cache (host memory, reported separately).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from distill.checks import team_problems

GIB = 2.0 ** 30


@dataclass(frozen=True, kw_only=True)
class Coefficients:
    activation: float
    """c_act: dtype-sized words kept by one group's replay graph, per sample and per element that
    the student's convolutions output (so bytes = c_act · g · A · s)."""
    runtime_bytes: float
    """Allocations that do not grow with the problem (workspaces, lazily initialised kernels)."""
    param_vectors: float = 6.0
    """c_P: P-sized vectors alive besides θ_0…θ_N (target, λ, H·λ, step gradient and its
    autograd buffer, the student's own weights), counted in distill/matching.py."""


# Where the numbers come from (bench/results/memory_model_cpu.md has the measurements, the fit
# and the held-out comparison; `python bench/memory_model.py --fit` redoes them):
#  - activation 11.3: least-squares fit (11.29) of the step memory measured on CPU for the four
#    calibration settings of bench/memory_model.py (replay, ConvNet-BN width 32-128, 32×32 RGB,
#    g = 32-128), with glibc's mmap threshold fixed so that freed tensors leave the RSS. The same
#    value predicts the nine held-out CPU settings within 2% and the H200 replay-prototype
#    anchors (bench/results/anchors_design_h200.json, |b| = 500 … 5000) within 4%.
#  - cpu runtime 39 MiB: the intercept of that fit (oneDNN primitives, kornia and autograd state
#    that the first step loads).
#  - cuda runtime 0.144 GiB: the H200 replay prototype's |b| = g = 125 anchor (1.18 GiB) minus the modelled
#    terms (cuDNN/cuBLAS workspaces); the other four anchors are held out.
# The compiled path (distill/student.py FastSteps) is modelled with the same activation
# coefficient: not calibrated separately yet; on CPU it kept less (bench/results/
# matching_cpu_cpu_fast.md: Δ 0.045 vs 0.101 GiB at 32 rows, width 64), so this errs high.
# `python bench/memory_model.py --fit --method fast` calibrates it (about a minute of compiling
# per setting on CPU).
COEFFICIENTS: dict[str, Coefficients] = {
    "cpu": Coefficients(activation=11.3, runtime_bytes=39 * 2.0 ** 20),
    "cuda": Coefficients(activation=11.3, runtime_bytes=0.144 * GIB),
}
DEVICES = tuple(COEFFICIENTS)

# --------------------------------------------------------------------------------------------
# The network: parameters, conv output elements and FLOPs, from the meta device
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Network:
    """The student network as `build_model` takes it."""

    name: str
    in_channels: int
    num_classes: int
    image_size: int
    width: int
    depth: int | None
    norm: str

    def build(self) -> torch.nn.Module:
        from distill.models import build_model

        with torch.device("meta"):
            return build_model(self.name, in_channels=self.in_channels,
                               num_classes=self.num_classes, image_size=self.image_size,
                               width=self.width, depth=self.depth, norm=self.norm)


@functools.lru_cache(maxsize=64)
def network_facts(net: Network) -> tuple[int, int]:
    """(P, A): parameters, and elements output by the convolutions per sample."""
    model = net.build()
    outputs: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out[0].numel()))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    model(torch.zeros(1, net.in_channels, net.image_size, net.image_size, device="meta"))
    for h in hooks:
        h.remove()
    return sum(p.numel() for p in model.parameters()), sum(outputs)


@functools.lru_cache(maxsize=64)
def group_flops(net: Network, group: int) -> tuple[int, int]:
    """FLOPs of one BN group in a forward step (loss + ∇θ) and in a replay step (loss, ∇θ with
    create_graph, then ∇ of g·λ w.r.t. θ and the images), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from distill.params import ParamLayout, functional_forward, step_loss

    model = net.build().train()
    layout = ParamLayout.of(model)
    buffers = dict(model.named_buffers())
    # non-leaf inputs: FlopCounterMode's hooks refuse leaves in a double backward
    theta = torch.zeros(layout.numel, device="meta", requires_grad=True) * 1
    x = torch.zeros(group, net.in_channels, net.image_size, net.image_size, device="meta",
                    requires_grad=True) * 1
    y = torch.zeros(group, dtype=torch.long, device="meta")

    def loss() -> torch.Tensor:
        return step_loss(functional_forward(model, theta, x, layout, buffers=buffers), y, group)

    with FlopCounterMode(display=False) as forward:
        torch.autograd.grad(loss(), theta)
    with FlopCounterMode(display=False) as replay:
        g = torch.autograd.grad(loss(), theta, create_graph=True)[0]
        torch.autograd.grad((g * torch.ones_like(g)).sum(), [theta, x])
    return forward.get_total_flops(), replay.get_total_flops()


# --------------------------------------------------------------------------------------------
# One matching step's shape and its memory
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MatchingShape:
    """Everything the model needs about one matching step."""

    net: Network
    batch: int          # |b|
    group: int          # g
    steps: int          # N
    n_images: int       # the synthetic set on the device
    n_matched: int      # rows matched (the whole set; D_distill alone in merge mode)
    n_learnable: int    # rows with a gradient and momentum
    joint: bool         # the matched rows are a copy of the set (joint mode)
    dsa: bool = True    # DSA on each student minibatch (time profiles are matched on it)
    dtype_bytes: int = 4
    ranks: int = 1                      # ranks sharing the step
    group_ranks: int = 1                # ranks sharing each BN group (distill.group_ranks)
    compiled: bool = False              # the compiled path runs (all groups of a rank per call)
    groups_per_call: int | None = None  # compiled path: at most this many groups per call

    @property
    def rank_groups(self) -> int:
        """Groups the busiest team processes per step."""
        return -(-self.groups // max(self.ranks // self.group_ranks, 1))

    @property
    def rows_per_call(self) -> float:
        """Rows whose graph is alive at once on the busiest rank."""
        part = self.group / self.group_ranks
        if self.compiled:
            return min(self.rank_groups, self.groups_per_call or self.rank_groups) * part
        return self.rank_groups * part if self.group_ranks > 1 else self.group

    @property
    def groups(self) -> int:
        return self.batch // self.group

    @property
    def params(self) -> int:
        return network_facts(self.net)[0]

    @property
    def image_numel(self) -> int:
        return self.net.in_channels * self.net.image_size ** 2

    def with_group(self, group: int) -> MatchingShape:
        from dataclasses import replace

        return replace(self, group=group)


def shape_from_config(cfg, info=None, *, ranks: int = 1, device: str = "cuda") -> MatchingShape:
    """The matching step of a :class:`RunConfig` (dataset facts from the registry, no files)."""
    from distill.batching import matched_images, resolve
    from distill.data import get_info
    from distill.selection import split_counts

    if info is None:
        info = get_info(cfg.data.name, train_per_class=cfg.data.train_per_class,
                        options=cfg.data.options, root=cfg.data.root)
    c, h, _ = info.image_shape
    k = info.num_classes
    n = cfg.select.ipc * k
    n_d = split_counts(cfg.select.ipc, cfg.distill.alpha)[1] * k
    merge = cfg.distill.mode == "merge"
    n_matched = matched_images(cfg, k)
    batching = resolve(cfg.distill, n_matched)
    net = Network(name=cfg.model.name, in_channels=c, num_classes=k, image_size=h,
                  width=cfg.model.width, depth=cfg.model.depth, norm=cfg.model.norm)
    return MatchingShape(net=net, batch=batching.batch, group=batching.group,
                         steps=cfg.distill.syn_steps, n_images=n, n_matched=n_matched,
                         n_learnable=n_d, joint=not merge, dsa=cfg.distill.augment == "dsa",
                         ranks=ranks, group_ranks=cfg.distill.group_ranks,
                         compiled=compiled_path(cfg, net, device),
                         groups_per_call=cfg.distill.groups_per_call)


def compiled_path(cfg, net: Network, device: str) -> bool:
    """Whether the distiller would run the compiled path (distill.student.use_fast_path)."""
    from distill.student import use_fast_path

    return use_fast_path(cfg.distill.compile, net.build(), torch.device(device),
                         cfg.distill.group_ranks)[0]


def memory(shape: MatchingShape, device: str = "cuda") -> dict[str, float]:
    """Peak bytes of one rank's matching step, by component (see the module docstring)."""
    if device not in COEFFICIENTS:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    co, s = COEFFICIENTS[device], shape.dtype_bytes
    params, act = network_facts(shape.net)
    d = shape.image_numel
    return {
        "activations": co.activation * shape.rows_per_call * act * s,
        "parameter vectors": (shape.steps + 1 + co.param_vectors) * params * s,
        "synthetic set": (shape.n_images + (shape.n_matched if shape.joint else 0)) * d * s,
        "image gradient": shape.n_matched * d * s,
        "learnable rows' grad + momentum": 2 * shape.n_learnable * d * s,
        "runtime": co.runtime_bytes,
    }


def peak_bytes(shape: MatchingShape, device: str = "cuda") -> float:
    return sum(memory(shape, device).values())


def fitting_group(shape: MatchingShape, budget: float, device: str = "cuda") -> int | None:
    """The largest BN group size dividing |b| whose peak fits in ``budget`` bytes (None: none),
    one group per call (``groups_per_call: 1`` on the compiled path)."""
    from dataclasses import replace

    for g in sorted((d for d in range(1, shape.batch + 1) if shape.batch % d == 0), reverse=True):
        if team_problems(shape.group_ranks, group=g):
            continue
        if peak_bytes(replace(shape, group=g, groups_per_call=1), device) <= budget:
            return g
    return None


def fitting_groups_per_call(shape: MatchingShape, budget: float,
                            device: str = "cuda") -> int | None:
    """Compiled path: the most BN groups per call (same g) whose peak fits (None: not even 1)."""
    from dataclasses import replace

    for k in range(shape.rank_groups, 0, -1):
        if peak_bytes(replace(shape, groups_per_call=k), device) <= budget:
            return k
    return None


# --------------------------------------------------------------------------------------------
# Communication, storage, FLOPs
# --------------------------------------------------------------------------------------------


def rank_share(groups: int, ranks: int) -> int:
    """Groups the busiest rank processes per step (distill.matching.rank_groups)."""
    return -(-groups // ranks)


def communication(shape: MatchingShape, ranks: int) -> dict[str, float]:
    """Per outer iteration: what is all-reduced (docs/distributed.md §2) and, for a ring
    all-reduce, what each rank sends: 2(R−1)/R of the payload. Zero for one rank."""
    s = shape.dtype_bytes
    payload = 2 * shape.steps * shape.params * s + (shape.n_matched * shape.image_numel + 1) * s
    calls = 2 * shape.steps + 2
    sent = 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * payload
    team = {"team_all_reduces": 0, "team_payload_bytes": 0.0}
    if shape.group_ranks > 1:  # 4 per BN layer in a forward step, 8 in a replayed step
        layers = network_bn_layers(shape.net)
        team = {"team_all_reduces": 12 * layers * shape.steps,
                "team_payload_bytes": 12 * shape.steps * shape.rank_groups * s
                * network_bn_channels(shape.net)}
    return {"payload_bytes": payload, "all_reduces": calls, "sent_per_rank_bytes": sent, **team}


def network_bn_layers(net: Network) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.build().modules())


def network_bn_channels(net: Network) -> int:
    """Channels summed over the batch-norm layers (the floats of one group's statistics)."""
    return sum(m.num_features for m in net.build().modules() if isinstance(m, torch.nn.BatchNorm2d))


def expert_storage(num_experts: int, epochs: int, params: int, dtype_bytes: int = 4) -> float:
    """Bytes of the expert trajectories: experts × (E + 1) × P × 4."""
    return num_experts * (epochs + 1) * params * dtype_bytes


def iteration_flops(shape: MatchingShape, ranks: int = 1) -> tuple[float, float]:
    """(all ranks, busiest rank) FLOPs of one outer iteration: N forward steps and N replay
    steps, each over the rank's groups."""
    forward, replay = group_flops(shape.net, shape.group)
    per_group = shape.steps * (forward + replay)
    teams = max(ranks // shape.group_ranks, 1)
    return (per_group * shape.groups,
            per_group * rank_share(shape.groups, teams) // shape.group_ranks)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2.0 ** 20), ("KiB", 2.0 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_flops(n: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} FLOP"


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2 ** 10, "m": 1e6, "mb": 1e6, "mib": 2 ** 20,
          "g": 1e9, "gb": 1e9, "gib": 2 ** 30, "t": 1e12, "tb": 1e12, "tib": 2 ** 40}


def parse_size(text: str) -> float:
    """'80GiB', '80 GB', '141G', '4096MiB' or a number of bytes -> bytes (G = 10^9, GiB = 2^30)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"device memory must be a positive size such as 80GiB, 141GB or "
                         f"4096MiB (units: {', '.join(u for u in _UNITS if u)}); got {text!r}")
    return float(m.group(1)) * _UNITS[unit]
