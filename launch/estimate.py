"""``selmatch estimate``: memory, storage, communication and time of a config, before renting GPUs.

    selmatch estimate --config configs/cifar10_ipc1000.yaml                      # one GPU
    selmatch estimate --config configs/cifar10_ipc1000.yaml --gpus 8 --device-memory 80GiB \\
        --distill.batch_syn 1000 --distill.bn_group 125
    selmatch estimate --config configs/quickstart.yaml --device cpu              # this CPU

Per rank: the matching step's peak memory by component (distill/estimate.py, validated against
measured peaks in bench/results/memory_model_cpu.md), the expert trajectories on storage, what is
all-reduced per iteration, the FLOPs per iteration (counted) and, when bench/results/ holds a
measured profile of the same network shape and device kind, the time per iteration and per run;
on CUDA without one, the time from a fit to the recorded GPU anchors
(bench/results/anchors_*.json: the card, the fit's error and whether the run is inside the measured
range are printed with it).
With ``--device-memory`` (or, on CUDA/CPU here, the memory found) it says whether the step fits
and which ``distill.bn_group`` does. Exit status 0 whether or not it fits: it only reports.
"""

from __future__ import annotations

from distill.config_io import load_config
from distill.estimate import fmt_bytes, fmt_flops, parse_size
from distill.preflight import (
    HEADROOM,
    RunEstimate,
    device_memory_here,
    estimate_run,
    summary_line,
    usable,
)


def report(e: RunEstimate) -> str:
    s = e.shape
    lines = [f"matching step per rank ({e.device}, {e.ranks} rank(s)): |b| {s.batch} = "
             f"{s.groups} BN group(s) of g {s.group}, N {s.steps}, {s.n_images} synthetic images "
             f"({s.n_learnable} learnable, {s.n_matched} matched), student P = {s.params:,}"]
    width = max(len(k) for k in e.memory)
    for key, value in e.memory.items():
        lines.append(f"  {key:<{width}}  {fmt_bytes(value):>10}")
    lines.append(f"  {'peak':<{width}}  {fmt_bytes(e.peak):>10}")
    lines.append("  (the step's own live tensors, modelled; the log's memory column is another "
                 "quantity: the process's peak RSS on CPU, which adds the interpreter, libraries "
                 "and data, and glibc may keep freed memory (bench/results/memory_model_cpu.md); "
                 "PyTorch's peak allocation on CUDA)")
    if e.device_memory is not None:
        verdict = "fits" if e.fits else "DOES NOT FIT"
        lines.append(f"  device memory {fmt_bytes(e.device_memory)}, usable "
                     f"{fmt_bytes(usable(e.device_memory))} ({HEADROOM:.0%} kept free): {verdict}")
    else:
        lines.append("  (give --device-memory, e.g. 80GiB, to check the fit)")
    lines.append(f"expert trajectories: {fmt_bytes(e.experts_storage)} on storage "
                 f"(experts × (E+1) × P × 4 bytes); the distiller caches "
                 f"{fmt_bytes(e.host_cache)} of them in host memory")
    c = e.comm
    lines.append(f"communication per iteration: {c['all_reduces']} all-reduces, "
                 f"{fmt_bytes(c['payload_bytes'])} payload; each rank sends "
                 f"{fmt_bytes(c['sent_per_rank_bytes'])} (ring, 2(R−1)/R of the payload)")
    total, busiest = e.flops
    lines.append(f"compute per iteration: {fmt_flops(total)} ({fmt_flops(busiest)} on the "
                 f"busiest rank), counted on the meta device")
    if e.time is not None:
        u = e.time.uncertainty
        spread = "" if u is None else (
            f", uncertainty unknown (±{u:.0%} holds inside the measured range only)"
            if e.time.extrapolated else
            f" ±{u:.0%} ({_duration(e.time.seconds * e.iterations * (1 - u))} … "
            f"{_duration(e.time.seconds * e.iterations * (1 + u))})")
        kind = "the nearest measured record" if u is None else "a fit to recorded anchors"
        lines.append(f"time: ~{e.time.seconds:.3g} s/iteration, "
                     f"~{_duration(e.time.seconds * e.iterations)} for {e.iterations:,} "
                     f"iterations{spread}, from {kind} ({e.time.distance}): {e.time.source}")
    else:
        lines.append("time: no measured profile of this device kind and path in bench/results/ "
                     "(python bench/matching.py or bench/loop_profile.py records one); FLOPs "
                     "above")
    lines += [f"warning: {w}" for w in e.warnings]
    lines.append(summary_line(e))
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 60:.3g} min" if seconds >= 60 else f"{seconds:.3g} s"


def cmd_estimate(args, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides)
    memory = parse_size(args.device_memory) if args.device_memory else \
        device_memory_here(args.device)
    e = estimate_run(cfg, ranks=args.gpus, device=args.device, device_memory=memory)
    print(report(e))
    return 0
