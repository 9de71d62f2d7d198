"""One matching step, replay vs full unroll: seconds per iteration and peak memory.

    python bench/matching.py                         # CPU: --preset cpu (a few minutes on 2 cores)
    python bench/matching.py --preset gpu-cifar10    # one GPU: the DESIGN.md §4 anchors
    python bench/matching.py --device cuda           # one GPU: CIFAR-10 IPC 250 shape, full grid
    python bench/matching.py --preset cpu --batch 16 --steps 2 4 --iters 1   # smoke run

The problem is a ConvNet-BN student (``--width --depth``) on ``--n-images`` random-normal
images of ``--channels`` × ``--image-size``² with labels ``i % --classes``. The start parameters
are PyTorch's default initialisation (flattened with ParamLayout) and the target is the start plus
N(0, 0.01²) noise: the values do not matter for timing, only the shapes do. Iteration i uses
``make_plan(seed, iteration=i)`` (batches and DSA parameters), built outside the timed region and
moved to the device; the same seed gives replay and unroll identical inputs, so their losses and
gradients are compared as a sanity check (printed under the table).

Configurations are the product ``--methods × --batch × --steps`` (|b| and N), or an explicit
``--configs replay:125x55 unrolled:500x55``. A configuration whose |b| exceeds ``--n-images``
uses a set of |b| images (DESIGN's 5000 × 80 is CIFAR-10 IPC 500). Explicit flags override the
preset's values.

Memory. CUDA: all configurations in one process; ``max_memory_allocated`` after
``reset_peak_memory_stats`` (peak), and the same minus what was allocated right before the first
step (Δ: activations + replay state). CPU: every configuration in a fresh subprocess (``--one``);
peak = the process's peak RSS during the steps (VmHWM, reset through /proc/self/clear_refs right
before the first step; ru_maxrss when that is not allowed), Δ = peak − RSS right before the first
step. Out-of-memory is recorded as OOM, not raised. On CPU, unrolled configurations whose memory,
extrapolated per image-step from the unrolled runs already measured, would exceed
``--max-rss-gib`` (or whose |b|·N exceeds ``--skip-unrolled-above``) are recorded as skipped.

TF32: off unless ``--tf32``. Note that PyTorch's own default has cuDNN TF32 *on* for convolutions;
without ``--tf32`` this script turns it off, so convolutions run in strict fp32.

Timing: wall seconds per step (mean ± sd) and the process's CPU seconds per step; on a shared CPU
machine the latter is the steadier figure. The cpu preset runs one torch thread (``--threads``):
two OpenMP threads on two cores slowed about 20x whenever another process took a core.

Writes ``--out`` (default bench/results/matching_<cpu|gpu name>) .json (records, command, machine,
torch version, date) and .md (the table under a line naming the machine and the command).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as `python bench/matching.py` without an installed package
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from distill.augment import DSA  # noqa: E402
from distill.matching import (MatchPlan, StepPlan, Student, make_plan, match_replay,  # noqa: E402
                              match_unrolled)
from distill.models import ParamLayout, build_model  # noqa: E402

METHODS = {"replay": match_replay, "unrolled": match_unrolled}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
GIB = 2.0 ** 30
RESULT_MARK = "@@matching-result@@"

# Values used when neither a flag nor the preset gives one: the CIFAR-10 IPC 250 shape.
BASE = {"width": 128, "depth": 3, "image_size": 32, "channels": 3, "classes": 10,
        "n_images": 2500, "batch": [125, 500, 1000], "steps": [10, 20, 55],
        "methods": ["replay", "unrolled"], "configs": None, "iters": 3, "warmup": 1,
        "dtype": "float32", "dsa": True, "group": None, "tf32": False, "seed": 0,
        "threads": None}
PRESETS = {
    # 2 CPU cores, a few minutes: replay's memory flat in N, unroll's growing with |b|·N
    # One torch thread: on a shared 2-core box, 2 OpenMP threads slowed 20x when other
    # processes took a core (threads spin at barriers waiting for a descheduled partner).
    "cpu": {"width": 32, "image_size": 16, "n_images": 500, "batch": [32, 64],
            "steps": [5, 10, 20, 40], "iters": 2, "warmup": 1, "threads": 1},
    # DESIGN.md §4 anchors; the reference unroll OOMs at |b| >= 1000 on a 141 GiB H200
    "gpu-cifar10": {"configs": ["replay:125x55", "replay:500x55", "replay:1000x55",
                                "replay:5000x80", "unrolled:125x55", "unrolled:500x55"]},
    "none": {},
}
GRID_KEYS = ("batch", "steps", "methods")


# --------------------------------------------------------------------------------------------
# Memory probes
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident bytes now (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def lifetime_peak_rss() -> int:
    """ru_maxrss in bytes (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def peak_rss_since_reset() -> int:
    kib = _status_kib("VmHWM")
    return lifetime_peak_rss() if kib is None else kib * 1024


def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


# --------------------------------------------------------------------------------------------
# One configuration, in this process
# --------------------------------------------------------------------------------------------


def build_problem(spec: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Student, start/target θ, images, labels and lr; deterministic in spec['seed']."""
    torch.manual_seed(spec["seed"])
    model = build_model("convnet", in_channels=spec["channels"], num_classes=spec["classes"],
                        image_size=spec["image_size"], width=spec["width"], depth=spec["depth"],
                        norm="batch")
    start = ParamLayout.of(model).flatten(model).detach().to(device, dtype)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    noise = 0.01 * torch.randn(start.shape, generator=gen, dtype=torch.float64)
    target = start + noise.to(device, dtype)
    n, size = spec["n_images"], spec["image_size"]
    images = torch.randn(n, spec["channels"], size, size, generator=gen,
                         dtype=torch.float64).to(device, dtype)
    labels = torch.arange(n, device=device) % spec["classes"]
    probe = torch.randn(images.numel(), generator=gen, dtype=torch.float64).to(device, dtype)
    dsa = DSA() if spec["dsa"] else None
    student = Student.of(model.to(device), dsa, dtype, device)
    lr = torch.tensor(0.01, device=device, dtype=dtype)
    return {"student": student, "start": start, "target": target, "images": images,
            "labels": labels, "lr": lr, "probe": probe}


def plan_for(spec: dict, iteration: int, dsa: DSA | None, device: torch.device) -> MatchPlan:
    plan = make_plan(spec["n_images"], batch=spec["batch"], steps=spec["steps"],
                     group=spec["group"], image_size=(spec["image_size"],) * 2, dsa=dsa,
                     seed=spec["seed"], iteration=iteration)
    return MatchPlan(tuple(StepPlan(s.index.to(device), None if s.aug is None else s.aug.to(device))
                           for s in plan.steps), plan.group)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(spec: dict, p: dict, device: torch.device, mem: dict) -> dict:
    fn = METHODS[spec["method"]]
    times, cpu_times, plan_s, checks = [], [], [], []
    for i in range(spec["warmup"] + spec["iters"]):
        t0 = time.perf_counter()
        plan = plan_for(spec, i, p["student"].dsa, device)
        plan_s.append(time.perf_counter() - t0)
        if i == 0:  # the baseline: everything but the step's own allocations
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                mem["before"] = torch.cuda.memory_allocated(device)
            else:
                mem["before"] = current_rss()
                mem["rss_probe"] = "VmHWM reset" if reset_peak_rss() else "ru_maxrss (lifetime)"
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        res = fn(p["student"], p["start"], p["target"], p["images"], p["labels"], p["lr"], plan)
        _sync(device)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        if i >= spec["warmup"]:
            times.append(seconds)
            cpu_times.append(cpu_seconds)
        gi = res.grad_images.reshape(-1).double()
        checks.append({"loss": float(res.loss), "grad_lr": float(res.grad_lr),
                       "grad_images_norm": float(gi.norm()),
                       "grad_images_probe": float(gi @ p["probe"].double())})
        del res, gi, plan
    mean = sum(times) / len(times)
    sd = (sum((t - mean) ** 2 for t in times) / max(len(times) - 1, 1)) ** 0.5
    return {"s_per_iter": mean, "s_std": sd, "times": times,
            "cpu_s_per_iter": sum(cpu_times) / len(cpu_times),
            "plan_s": sum(plan_s) / len(plan_s), "checks": checks,
            "image_steps_per_s": spec["batch"] * spec["steps"] / mean}


def measure(spec: dict) -> dict:
    """Time and memory of one configuration in this process; OOM becomes a record."""
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = spec["tf32"]
        torch.backends.cudnn.allow_tf32 = spec["tf32"]
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)  # an OOM while building reads this config's peak
    record = {**spec, "status": "ok"}
    mem: dict = {}
    try:
        problem = build_problem(spec, device, dtype)
        record.update(_timed_steps(spec, problem, device, mem))
    except (RuntimeError, MemoryError) as err:
        if not is_oom(err):
            raise
        record.update(status="OOM", error=str(err).splitlines()[0][:300])
    problem = None  # noqa: F841 (drop the tensors before reading the allocator)
    gc.collect()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        record["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        torch.cuda.empty_cache()
    else:
        peak = peak_rss_since_reset()
        record["rss_probe"] = mem.get("rss_probe")
        record["lifetime_peak_rss_gib"] = lifetime_peak_rss() / GIB
    record["peak_gib"] = peak / GIB
    if "before" in mem:
        record["before_gib"] = mem["before"] / GIB
        record["delta_gib"] = (peak - mem["before"]) / GIB
    return record


def measure_isolated(spec: dict) -> dict:
    """``measure`` in a fresh interpreter, so peak RSS belongs to this configuration alone."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    low = tail.lower()
    oom = proc.returncode == -9 or "out of memory" in low or "can't allocate memory" in low
    status = "OOM" if oom else "error"
    return {**spec, "status": status, "error": f"subprocess exit {proc.returncode}: {tail}"}


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def parse_configs(entries: list[str]) -> list[tuple[str, int, int]]:
    out = []
    for e in entries:
        m = re.fullmatch(r"(\w+):(\d+)x(\d+)", e)
        if not m or m.group(1) not in METHODS:
            raise ValueError(f"--configs entry {e!r} must be METHOD:BATCHxSTEPS with METHOD in "
                             f"{', '.join(METHODS)}, e.g. replay:125x55")
        out.append((m.group(1), int(m.group(2)), int(m.group(3))))
    return out


def config_specs(s: dict, device: torch.device) -> list[dict]:
    if s["configs"]:
        triples = parse_configs(s["configs"])
    else:
        bad = [m for m in s["methods"] if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
        triples = [(m, b, n) for m in s["methods"] for b in s["batch"] for n in s["steps"]]
    order = {m: i for i, m in enumerate(METHODS)}
    triples = sorted(set(triples), key=lambda t: (order[t[0]], t[1] * t[2], t[1]))
    shape = {k: s[k] for k in ("width", "depth", "image_size", "channels", "classes", "iters",
                                "warmup", "dtype", "dsa", "tf32", "seed", "threads")}
    return [{**shape, "method": m, "batch": b, "steps": n, "device": str(device),
             "group": min(s["group"] or b, b), "n_images": max(s["n_images"], b)}
            for m, b, n in triples]


def unrolled_guard(spec: dict, done: list[dict], s: dict) -> str | None:
    """Why an unrolled CPU config is skipped, or None to run it."""
    work = spec["batch"] * spec["steps"]
    if s["skip_unrolled_above"] and work > s["skip_unrolled_above"]:
        return f"|b|·N = {work} > --skip-unrolled-above {s['skip_unrolled_above']}"
    points = [(r["batch"] * r["steps"], r["delta_gib"]) for r in done
              if r["method"] == "unrolled" and r["status"] == "ok" and r.get("delta_gib", 0) > 0]
    if points and s["max_rss_gib"]:
        before = max(r["before_gib"] for r in done if "before_gib" in r)
        predicted = before + 1.15 * _extrapolate(points, work)
        if predicted > s["max_rss_gib"]:
            return f"predicted {predicted:.1f} GiB > --max-rss-gib {s['max_rss_gib']:.1f}"
    return None


def _extrapolate(points: list[tuple[int, float]], work: int) -> float:
    """Δ at |b|·N = work: a least-squares line through the measured points (fixed cost + cost per
    image-step), or proportional through the origin (an over-estimate) from a single size."""
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return max(d / x for x, d in points) * work
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(d for _, d in points) / n
    slope = (sum((x - mx) * (d - my) for x, d in points) /
             sum((x - mx) ** 2 for x, _ in points))
    return max(my + slope * (work - mx), max(d for _, d in points))


def run_grid(specs: list[dict], s: dict, isolate: bool) -> list[dict]:
    done = []
    for spec in specs:
        why = unrolled_guard(spec, done, s) if (spec["method"] == "unrolled" and
                                                 spec["device"] == "cpu") else None
        if why:
            rec = {**spec, "status": "skipped", "error": why}
        else:
            load_1min = (load_average() or [None])[0]
            rec = measure_isolated(spec) if isolate else measure(spec)
            rec["load_1min"] = load_1min
        done.append(rec)
        print(row_text(rec), flush=True)
    return done


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

COLUMNS = ("method", "|b|", "N", "g", "n", "s/iter", "CPU s/iter", "peak GiB", "Δ GiB",
           "image-steps/s")


def _cells(r: dict) -> list[str]:
    ok = r["status"] == "ok"
    cells = [r["method"], str(r["batch"]), str(r["steps"]), str(r["group"]), str(r["n_images"]),
             f"{r['s_per_iter']:.3f} ± {r['s_std']:.3f}" if ok else r["status"],
             f"{r['cpu_s_per_iter']:.3f}" if ok else "",
             f"{r['peak_gib']:.3f}" if "peak_gib" in r else "",
             f"{r['delta_gib']:.3f}" if "delta_gib" in r else "",
             f"{r['image_steps_per_s']:.0f}" if ok else ""]
    return cells


def row_text(r: dict) -> str:
    note = f"  [{r['error']}]" if r.get("error") else ""
    return "  ".join(f"{c:>14}" if i > 4 else f"{c:>8}" for i, c in enumerate(_cells(r))) + note


def table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in COLUMNS) + " | note |",
             "|" + " --- |" * (len(COLUMNS) + 1)]
    for r in records:
        note = r.get("error", "").replace("|", "\\|")
        lines.append("| " + " | ".join(_cells(r)) + f" | {note} |")
    return "\n".join(lines)


def agreement(records: list[dict]) -> str | None:
    """Max relative difference replay vs unrolled over configs both ran (same plans and inputs)."""
    ok = {(r["method"], r["batch"], r["steps"]): r for r in records if r["status"] == "ok"}
    worst = {}
    for (m, b, n), r in ok.items():
        u = ok.get(("unrolled", b, n))
        if m != "replay" or u is None:
            continue
        for cr, cu in zip(r["checks"], u["checks"]):
            for k, v in cr.items():
                rel = abs(v - cu[k]) / max(abs(v), abs(cu[k]), 1e-30)
                worst[k] = max(worst.get(k, 0.0), rel)
    if not worst:
        return None
    return ("replay vs unrolled, same plans: max relative difference " +
            ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def machine(device: torch.device, threads: int | None = None) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{torch.cuda.get_device_name(device)} ({props.total_memory / GIB:.0f} GiB)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} CPU cores, {threads or torch.get_num_threads()} torch "
            f"thread(s), no GPU used")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_results(out: str, records: list[dict], s: dict, device: torch.device,
                  load: dict) -> None:
    when = datetime.now(timezone.utc)
    script = os.path.relpath(os.path.abspath(__file__), ROOT)
    command = shlex.join(["python", script] + sys.argv[1:])
    doc = {"command": command, "machine": machine(device, s["threads"]), "torch": torch.__version__,
           "python": platform.python_version(), "date": when.isoformat(timespec="seconds"),
           "load_average": load, "settings": s, "agreement": agreement(records),
           "records": records}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    mem = ("peak = max_memory_allocated; Δ = peak − allocated before the first step"
           if device.type == "cuda" else
           "peak = peak RSS during the steps (fresh process per row); Δ = peak − RSS before the "
           "first step")
    shape = (f"ConvNet-BN width {s['width']} depth {s['depth']}, {s['image_size']}×"
             f"{s['image_size']}×{s['channels']}, {s['classes']} classes, {s['dtype']}, "
             f"DSA {'on' if s['dsa'] else 'off'}, TF32 {'on' if s['tf32'] else 'off'}, "
             f"{s['warmup']} warm-up + {s['iters']} timed iterations")
    with open(out + ".md", "w") as f:
        f.write(f"# Matching step, replay vs unroll: {doc['machine']}, torch {doc['torch']}, "
                f"{when:%Y-%m-%d %H:%M} UTC\n\n`{command}`\n\n{shape}. {mem}; s/iter is wall "
                f"time, mean ± sd; CPU s/iter is the process's CPU time (all threads); "
                f"n = synthetic set size; g = BN group. Load average (1, 5, 15 min) at "
                f"start {load['start']}, at end {load['end']}.\n\n{table(records)}\n")
        if doc["agreement"]:
            f.write(f"\n{doc['agreement']}.\n")
    print(f"wrote {out}.json and {out}.md")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--preset", default="auto", choices=("auto", *PRESETS),
                   help="auto: cpu on CPU, none (the CIFAR-10 IPC 250 grid) on CUDA")
    for name, kind in (("width", int), ("depth", int), ("image-size", int), ("channels", int),
                       ("classes", int), ("n-images", int), ("iters", int), ("warmup", int),
                       ("group", int), ("seed", int)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=None, help="|b| values")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="N values")
    p.add_argument("--methods", nargs="+", default=None, choices=tuple(METHODS))
    p.add_argument("--configs", nargs="+", default=None, help="METHOD:BxN entries (no grid)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    p.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; the cpu preset uses 1)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one subprocess per config (default: on CPU only)")
    p.add_argument("--max-rss-gib", type=float, default=None,
                   help="CPU: skip unrolled configs predicted above this (default 80%% of "
                        "MemAvailable)")
    p.add_argument("--skip-unrolled-above", type=int, default=None, help="CPU: max |b|·N")
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace, device: torch.device) -> dict:
    preset = args.preset if args.preset != "auto" else ("cpu" if device.type == "cpu" else "none")
    values = {**BASE, **PRESETS[preset]}
    explicit = {k: v for k, v in vars(args).items() if v is not None and k in values}
    if args.configs and any(k in explicit for k in GRID_KEYS):
        raise ValueError("give either --configs or --batch/--steps/--methods, not both")
    if any(k in explicit for k in GRID_KEYS):
        values["configs"] = None  # explicit grid flags replace the preset's configuration list
    values.update(explicit)
    values.update(preset=preset, skip_unrolled_above=args.skip_unrolled_above,
                  max_rss_gib=args.max_rss_gib)
    if device.type == "cpu" and values["max_rss_gib"] is None:
        available = _meminfo_kib("MemAvailable")
        values["max_rss_gib"] = None if available is None else 0.8 * available * 1024 / GIB
    return values


def _meminfo_kib(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one is not None:  # child: one configuration, result as one marked JSON line
        print(RESULT_MARK + json.dumps(measure(json.loads(args.one))), flush=True)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    s = resolve(args, device)
    specs = config_specs(s, device)
    isolate = device.type == "cpu" if args.isolate is None else args.isolate
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "_",
                                                     torch.cuda.get_device_name(device).lower())
    out = args.out or os.path.join(HERE, "results", f"matching_{slug.strip('_')}")
    print(f"{machine(device, s['threads'])}; torch {torch.__version__}; preset {s['preset']}; "
          f"{len(specs)} configs{' (one subprocess each)' if isolate else ''}", flush=True)
    print("  ".join(f"{c:>14}" if i > 4 else f"{c:>8}" for i, c in enumerate(COLUMNS)))
    load = {"start": load_average()}
    if device.type == "cpu" and load["start"] and load["start"][0] > 0.5:
        print(f"note: load average {load['start']} on {os.cpu_count()} cores: other processes "
              f"are running, CPU timings will be noisy", flush=True)
    records = run_grid(specs, s, isolate)
    load["end"] = load_average()
    print()
    print(table(records))
    line = agreement(records)
    if line:
        print(line)
    write_results(out, records, s, device, load)
    if any(r["status"] == "error" for r in records):
        raise SystemExit("some configurations failed; see the error column")


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad flags or configurations: a message, not a traceback
        raise SystemExit(f"bench/matching.py: {err}") from None
