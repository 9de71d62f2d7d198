"""What a run will need, checked before it starts (``selmatch estimate``; ``selmatch run`` and
``distill`` log the one-line summary): the matching step's peak memory per rank against the
device's (distill/estimate.py has the memory model), the expert trajectories on storage and in
host memory, the communication, the FLOPs and, with a measured profile (distill/profiles.py),
the time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from distill.batching import idle_ranks
from distill.checks import check_int
from distill.estimate import (
    MatchingShape,
    communication,
    expert_storage,
    fitting_group,
    fitting_groups_per_call,
    fmt_bytes,
    fmt_flops,
    iteration_flops,
    memory,
    peak_bytes,
    shape_from_config,
)
from distill.profiles import anchor_time, iteration_time, load_anchor_fits, load_profiles
from distill.trajectories import TrajectoryCache

log = logging.getLogger(__name__)

HEADROOM = 0.10
"""Share of the device memory kept free when checking a fit: the CUDA context and allocator
fragmentation are not in the model (a policy, not a measurement)."""


def host_memory_available() -> float | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) * 1024.0 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def device_memory_here(device: str, index: int = 0) -> float | None:
    """Total memory of this machine's CUDA device, or the host's available memory on CPU."""
    if device == "cpu":
        return host_memory_available()
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(index).total_memory)
    return None


def usable(device_memory: float) -> float:
    return device_memory * (1 - HEADROOM)


# --------------------------------------------------------------------------------------------
# A run's estimate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RunEstimate:
    shape: MatchingShape
    device: str
    ranks: int
    memory: dict[str, float]        # per rank, by component
    device_memory: float | None     # bytes the check used (None: no check)
    suggested_group: int | None     # when it does not fit: the largest g that does
    experts_storage: float          # all expert trajectories
    host_cache: float               # trajectories the distiller keeps in host memory
    comm: dict[str, float]
    flops: tuple[float, float]      # per iteration: all ranks, busiest rank
    time: object | None             # distill.profiles.TimeEstimate
    iterations: int
    warnings: tuple[str, ...]

    @property
    def peak(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= usable(self.device_memory)


def estimate_run(cfg, *, ranks: int = 1, device: str = "cuda", device_memory: float | None = None,
                 profiles: list | None = None, info=None) -> RunEstimate:
    """Memory, storage, communication, FLOPs and (with a matching profile) time of ``cfg``'s
    distillation on ``ranks`` ranks of ``device`` (cpu or cuda)."""
    check_int("ranks (--gpus)", ranks)
    shape = shape_from_config(cfg, info, ranks=ranks, device=device)
    mem = memory(shape, device)
    warnings, suggested = [], None
    per_call = fitting_groups_per_call(shape, usable(device_memory), device) \
        if device_memory is not None and shape.compiled else None
    if device_memory is not None and sum(mem.values()) > usable(device_memory) and per_call:
        warnings.append(
            f"does not fit: {fmt_bytes(sum(mem.values()))} > {fmt_bytes(usable(device_memory))} "
            f"usable; --distill.groups_per_call {per_call} fits (fewer BN groups per compiled "
            f"call: the result does not change)")
    elif device_memory is not None and sum(mem.values()) > usable(device_memory):
        suggested = fitting_group(shape, usable(device_memory), device)
        if suggested is None:
            warnings.append(
                f"does not fit: even g = 1 needs {fmt_bytes(peak_bytes(shape.with_group(1), device))}"
                f" of the "
                f"{fmt_bytes(usable(device_memory))} usable; lower distill.syn_steps, the IPC "
                f"or use a device with more memory")
        else:
            warnings.append(
                f"does not fit: {fmt_bytes(sum(mem.values()))} > {fmt_bytes(usable(device_memory))}"
                f" usable ({fmt_bytes(device_memory)} less {HEADROOM:.0%} headroom); "
                f"--distill.bn_group {suggested} fits (g is part of the math: it changes the "
                f"result, the number of ranks does not)")
    idle = idle_ranks(shape.batch, shape.group, shape.group_ranks, ranks)
    if idle is not None:
        warnings.append(idle)
    params = shape.params
    trajectory = expert_storage(1, cfg.experts.epochs, params)
    time = iteration_time(shape, ranks, device,
                          load_profiles() if profiles is None else profiles)
    if time is None and device == "cuda":  # no profile of this path yet: the recorded anchors
        time = anchor_time(shape, ranks, load_anchor_fits())
    return RunEstimate(
        shape=shape, device=device, ranks=ranks, memory=mem, device_memory=device_memory,
        suggested_group=suggested,
        experts_storage=expert_storage(cfg.experts.num_experts, cfg.experts.epochs, params),
        host_cache=min(TrajectoryCache.SIZE, cfg.experts.num_experts) * trajectory,
        comm=communication(shape, ranks), flops=iteration_flops(shape, ranks), time=time,
        iterations=cfg.distill.iterations, warnings=tuple(warnings))


def _plus_minus(t) -> str:
    if t.uncertainty is None:
        return ""
    return " (uncertainty unknown: extrapolated)" if t.extrapolated else f" ±{t.uncertainty:.0%}"


def summary_line(e: RunEstimate) -> str:
    """One line: peak per rank (and the fit), storage, communication, time or FLOPs."""
    s = e.shape
    fit = ""
    if e.fits is not None:
        fit = (f" of {fmt_bytes(e.device_memory)}" +
               ("" if e.fits else f", DOES NOT FIT (try --distill.bn_group {e.suggested_group})"
                if e.suggested_group else ", DOES NOT FIT"))
    if e.time is None:
        speed = f"{fmt_flops(e.flops[1])}/iteration per rank (no measured profile of this path)"
    else:
        speed = (f"~{e.time.seconds:.3g} s/iteration{_plus_minus(e.time)} ({e.time.distance}; "
                 f"from {e.time.source})")
    comm = (f", {fmt_bytes(e.comm['sent_per_rank_bytes'])} sent per rank and iteration"
            if e.ranks > 1 else "")
    path = "compiled" if s.compiled else "eager"
    return (f"estimate ({e.device}, {path} path, {e.ranks} rank(s), |b| {s.batch}, g {s.group}, "
            f"N {s.steps}): matching-step tensors {fmt_bytes(e.peak)} per rank (modelled peak "
            f"of the step's own tensors, not the process's memory){fit}; expert trajectories "
            f"{fmt_bytes(e.experts_storage)}{comm}; {speed}")


def log_summary(cfg, *, ranks: int, device: str) -> None:
    """Log the one-line summary (and warnings) at the start of ``selmatch run`` / ``distill``;
    an estimate that cannot be made is a warning, never fatal."""
    try:
        e = estimate_run(cfg, ranks=ranks, device=device,
                         device_memory=device_memory_here(device))
    except (ValueError, RuntimeError, FileNotFoundError, NotImplementedError) as err:
        log.warning("estimate unavailable: %s", err)
        return
    log.info("%s", summary_line(e))
    for w in e.warnings:
        log.warning("estimate: %s", w)
