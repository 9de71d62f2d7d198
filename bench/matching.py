"""The matching step: eager replay, compiled (fast) replay and the full unroll; s/iter, peak
memory and the image-gradient error against float64.

    python bench/matching.py                         # CPU: --preset cpu (a few minutes on 2 cores)
    python bench/matching.py --preset cpu-fast       # CPU: fast vs eager replay, |b| 32, N 10, width 64
    python bench/matching.py --preset gpu-cifar10 --budget 300   # one GPU: the paper's shape and beyond
    python bench/matching.py --preset cpu --batch 16 --steps 2 4 --iters 1   # smoke run

Methods: ``replay`` = the eager reference replay (``distill.compile: off``), ``fast`` = the
compiled replay (``distill.compile: on``: torch.compile of the functional ConvNet's torch.func
steps, CUDA graphs on CUDA), ``unrolled`` = ``match_unrolled``, the reference algorithm (one graph
through all N steps, what the MTT/SelMatch code does). The ``path`` column says what actually ran:
a fast row whose compilation failed is marked, never silently timed as eager.

The problem is a ConvNet-BN student (``--width --depth``) on ``--n-images`` random-normal
images of ``--channels`` × ``--image-size``² with labels ``i % --classes``. The start parameters
are PyTorch's default initialisation (flattened with ParamLayout); the target (``--targets``) is
either an expert-like segment, 20 plain SGD steps of the same network from the start computed in
float64 (``expert``, the default), or the start plus N(0, 0.01²) noise (``offset``), a problem
where every float32 path lands 1e-3 to 1e-2 from float64. The ``grad err`` column is the median
over plans (timed iterations); the per-plan errors follow the table. Iteration i uses ``make_plan(seed, iteration=i)`` (batches and DSA
parameters), built outside the timed region and moved to the device in one copy; the same seed
gives every method identical inputs, so their losses and gradients are compared (printed under
the table). ``grad err`` is the median over the timed iterations of the image gradient's relative
error against the eager replay of the same plan in float64 (``--reference``; rows with |b|·N above
``--reference-max-work`` skip it).

Configurations are the product ``--methods × --batch × --steps × --precision``, or an explicit
list ``--configs replay:125x55 fast:5000x80:g500@fp32`` (``:gG`` sets the BN group, ``@P`` the
precision). A configuration whose |b| exceeds ``--n-images`` uses a set of |b| images. Explicit
flags override the preset's values.

Precision (CUDA): ``tf32`` = cuDNN TF32 convolutions, PyTorch's default and what the reference
code ran with; ``fp32`` = strict. ``cudnn.benchmark`` is on for both (as in the reference). A
comparison with the reference is fair only at the same precision. On CPU every row is fp32.

Memory. CUDA: all configurations in one process; ``max_memory_allocated`` after
``reset_peak_memory_stats`` (peak), and the same minus what was allocated right before the first
step (Δ: activations + replay state). CPU: every configuration in a fresh subprocess (``--one``);
peak = the process's peak RSS during the steps (VmHWM, reset through /proc/self/clear_refs right
before the first step; ru_maxrss when that is not allowed), Δ = peak − RSS right before the first
step. Out-of-memory is recorded as OOM, not raised. On CPU, unrolled configurations whose memory,
extrapolated per image-step from the unrolled runs already measured, would exceed
``--max-rss-gib`` (or whose |b|·N exceeds ``--skip-unrolled-above``) are recorded as skipped.

Timing: wall seconds per step (mean ± sd) after ``--warmup`` iterations (``first s``: the first
iteration, which includes compilation for ``fast``), and the process's CPU seconds per step; on a
shared CPU machine the latter is the steadier figure. The cpu presets run one torch thread
(``--threads``): two OpenMP threads on two cores slowed about 20x whenever another process took a
core. ``--budget S``: no configuration starts after S seconds (recorded as skipped), so a GPU
session ends in time; the results are written after every row.

Writes ``--out`` (default bench/results/matching_<cpu|gpu name>) .json (records, command, machine,
torch version, date) and .md (the table under a line naming the machine and the command), through
bench/matching_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE):  # run as `python bench/matching.py` without an installed package
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

from matching_probe import GIB, METHODS, measure  # noqa: E402
from matching_report import (  # noqa: E402
    COLUMNS,
    agreement,
    load_average,
    machine,
    row_text,
    speedups,
    table,
    write_results,
)

RESULT_MARK = "@@matching-result@@"
PRECISIONS = ("tf32", "fp32")

# Values used when neither a flag nor the preset gives one: the CIFAR-10 IPC 250 shape.
BASE = {"width": 128, "depth": 3, "image_size": 32, "channels": 3, "classes": 10,
        "n_images": 2500, "batch": [125, 500, 1000], "steps": [10, 20, 55],
        "methods": ["replay", "fast", "unrolled"], "configs": None, "iters": 3, "warmup": 1,
        "dtype": "float32", "dsa": True, "group": None, "precision": None, "seed": 0,
        "threads": None, "reference": "eager", "reference_max_work": 125 * 55,
        "groups_per_call": None, "cuda_graphs": True, "targets": ["expert"]}
PRESETS = {
    # 2 CPU cores, a few minutes: replay's memory flat in N, unroll's growing with |b|·N
    # One torch thread: on a shared 2-core box, 2 OpenMP threads slowed 20x when other
    # processes took a core (threads spin at barriers waiting for a descheduled partner).
    "cpu": {"width": 32, "image_size": 16, "n_images": 500, "batch": [32, 64],
            "steps": [5, 10, 20, 40], "methods": ["replay", "unrolled"], "iters": 2,
            "warmup": 1, "threads": 1, "reference": None},
    # the CPU check: fast vs eager replay at a CIFAR shape small enough for minutes
    "cpu-fast": {"width": 64, "n_images": 500, "batch": [32], "steps": [10],
                 "methods": ["replay", "fast", "unrolled"], "iters": 5, "warmup": 1,
                 "threads": 1, "targets": ["expert", "offset"]},
    # the GPU rows: the H200 anchors' shape at both precisions, then the fast path at sizes
    # the reference unroll cannot hold (it OOMs at |b| >= 1000 on a 141 GiB H200)
    "gpu-cifar10": {"configs": [f"{m}:125x55@{p}" for p in PRECISIONS
                                for m in ("fast", "replay", "unrolled")]
                    + ["fast:1000x55@tf32", "fast:5000x80:g500@tf32", "fast:5000x80@tf32"],
                    "iters": 3, "warmup": 1},
    "none": {},
}
GRID_KEYS = ("batch", "steps", "methods", "precision")


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


def parse_configs(entries: list[str]) -> list[tuple[str, int, int, int | None, str | None]]:
    """``METHOD:BxN[:gG][@PRECISION]`` -> (method, |b|, N, g or None, precision or None)."""
    out = []
    for e in entries:
        m = re.fullmatch(r"(\w+):(\d+)x(\d+)(?::g(\d+))?(?:@(\w+))?", e)
        if not m or m.group(1) not in METHODS or (m.group(5) and m.group(5) not in PRECISIONS):
            raise ValueError(f"--configs entry {e!r} must be METHOD:BATCHxSTEPS[:gGROUP]"
                             f"[@PRECISION] with METHOD in {', '.join(METHODS)} and PRECISION in "
                             f"{', '.join(PRECISIONS)}, e.g. fast:5000x80:g500@tf32")
        out.append((m.group(1), int(m.group(2)), int(m.group(3)),
                    int(m.group(4)) if m.group(4) else None, m.group(5)))
    return out


def config_specs(s: dict, device: torch.device) -> list[dict]:
    precisions = s["precision"] or (list(PRECISIONS) if device.type == "cuda" else ["fp32"])
    if s["configs"]:
        rows = [(m, b, n, g, p) for m, b, n, g, pin in parse_configs(s["configs"])
                for p in ([pin] if pin else precisions)]
    else:
        bad = [m for m in s["methods"] if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
        rows = [(m, b, n, None, p) for p in precisions for b in s["batch"] for n in s["steps"]
                for m in s["methods"]]
        order = {m: i for i, m in enumerate(METHODS)}
        rows.sort(key=lambda t: (precisions.index(t[4]), t[1] * t[2], t[1], order[t[0]]))
    if device.type != "cuda" and any(p == "tf32" for *_, p in rows):
        raise ValueError("tf32 rows need CUDA: on CPU every convolution is fp32")
    shape = {k: s[k] for k in ("width", "depth", "image_size", "channels", "classes", "iters",
                                "warmup", "dtype", "dsa", "seed", "threads", "groups_per_call",
                                "cuda_graphs")}
    specs = []
    for target in s["targets"]:
        for m, b, n, g, p in dict.fromkeys(rows):
            work = b * n
            ref = s["reference"] if s["reference"] and work <= s["reference_max_work"] else None
            specs.append({**shape, "method": m, "batch": b, "steps": n, "device": str(device),
                          "group": min(g or s["group"] or b, b),
                          "n_images": max(s["n_images"], b), "precision": p, "reference": ref,
                          "target": target})
    return specs


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


def run_grid(specs: list[dict], s: dict, isolate: bool, save) -> list[dict]:
    """Measure each spec (skipping what the guards or the budget rule out); ``save(records)``
    after every row, so an interrupted GPU session keeps what it measured."""
    done, t0 = [], time.monotonic()
    for spec in specs:
        why = unrolled_guard(spec, done, s) if (spec["method"] == "unrolled" and
                                                 spec["device"] == "cpu") else None
        elapsed = time.monotonic() - t0
        if s.get("budget") and elapsed > s["budget"]:
            why = f"--budget {s['budget']:g} s spent ({elapsed:.0f} s)"
        if why:
            rec = {**spec, "status": "skipped", "error": why}
        else:
            load_1min = (load_average() or [None])[0]
            rec = measure_isolated(spec) if isolate else measure(spec)
            rec["load_1min"] = load_1min
        done.append(rec)
        print(row_text(rec), flush=True)
        save(done)
    return done


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
                       ("group", int), ("seed", int), ("groups-per-call", int),
                       ("reference-max-work", int)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=None, help="|b| values")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="N values")
    p.add_argument("--methods", nargs="+", default=None, choices=tuple(METHODS))
    p.add_argument("--precision", nargs="+", default=None, choices=PRECISIONS,
                   help="convolution precision of every row (default: both on CUDA, fp32 on CPU)")
    p.add_argument("--configs", nargs="+", default=None,
                   help="METHOD:BxN[:gG][@PRECISION] entries (no grid)")
    p.add_argument("--dtype", default=None, choices=("float32", "float64", "bfloat16", "float16"))
    p.add_argument("--dsa", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--targets", nargs="+", choices=("expert", "offset"), default=None,
                   help="the matching target: expert = 20 plain float64 SGD steps of the student "
                        "from the start (like an expert segment), offset = the start plus "
                        "N(0, 0.01²) noise (an ill-conditioned problem); each is its own rows")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="fast rows on CUDA: replay steps as CUDA graphs (default on)")
    p.add_argument("--reference", choices=("eager", "none"), default=None,
                   help="float64 reference for the grad err column (default eager, except the "
                        "cpu preset)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; the cpu presets use 1)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one subprocess per config (default: on CPU only)")
    p.add_argument("--max-rss-gib", type=float, default=None,
                   help="CPU: skip unrolled configs predicted above this (default 80%% of "
                        "MemAvailable)")
    p.add_argument("--skip-unrolled-above", type=int, default=None, help="CPU: max |b|·N")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: configurations not started by then are recorded as skipped")
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve(args: argparse.Namespace, device: torch.device) -> dict:
    preset = args.preset if args.preset != "auto" else ("cpu" if device.type == "cpu" else "none")
    values = {**BASE, **PRESETS[preset]}
    explicit = {k: v for k, v in vars(args).items() if v is not None and k in values}
    if args.configs and any(k in explicit for k in GRID_KEYS if k != "precision"):
        raise ValueError("give either --configs or --batch/--steps/--methods, not both")
    if any(k in explicit for k in GRID_KEYS if k != "precision"):
        values["configs"] = None  # explicit grid flags replace the preset's configuration list
    values.update(explicit)
    if values["reference"] == "none":
        values["reference"] = None
    values.update(preset=preset, skip_unrolled_above=args.skip_unrolled_above,
                  max_rss_gib=args.max_rss_gib, budget=args.budget)
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
    preset = "" if s["preset"] in ("cpu", "none") else "_" + s["preset"].replace("-", "_")
    out = args.out or os.path.join(HERE, "results", f"matching_{slug.strip('_')}{preset}")
    print(f"{machine(device, s['threads'])}; torch {torch.__version__}; preset {s['preset']}; "
          f"{len(specs)} configs{' (one subprocess each)' if isolate else ''}", flush=True)
    print("  ".join(f"{c:>8}" for c in COLUMNS))
    load = {"start": load_average()}
    if device.type == "cpu" and load["start"] and load["start"][0] > 0.5:
        print(f"note: load average {load['start']} on {os.cpu_count()} cores: other processes "
              f"are running, CPU timings will be noisy", flush=True)
    records = run_grid(specs, s, isolate, lambda done: write_results(out, done, s, device, load))
    load["end"] = load_average()
    write_results(out, records, s, device, load)
    print()
    print(table(records))
    for line in speedups(records) + [agreement(records) or ""]:
        if line:
            print(line)
    print(f"wrote {out}.json and {out}.md")
    if any(r["status"] == "error" for r in records):
        raise SystemExit("some configurations failed; see the error column")


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad flags or configurations: a message, not a traceback
        raise SystemExit(f"bench/matching.py: {err}") from None
