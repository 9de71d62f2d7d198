"""Check the matching-step memory model of distill/estimate.py against measured CPU peaks.

    python bench/memory_model.py              # measure every setting, compare, write results
    python bench/memory_model.py --fit        # also print the least-squares coefficients of the
                                              # calibration settings (paste into COEFFICIENTS)
    python bench/memory_model.py --from-json bench/results/memory_model_cpu.json   # re-compare
    python bench/memory_model.py --only V1 V2 # a subset (smoke run)

Each setting runs bench/matching.py's measurement (method replay, one fresh subprocess per
setting, 1 warm-up + 1 timed iteration, one torch thread, DSA on). What is compared is what the
step itself allocates: Δ = peak RSS during the steps − RSS right before the first step (the
interpreter, torch and the problem's tensors are already there), against the model's terms that
the step allocates: one group's activations, θ_1…θ_N and the in-step P-sized vectors, the image
gradient and the runtime constant.

RSS counts what the C allocator keeps, not only live tensors. glibc's default mmap threshold
adapts to freed sizes, after which freed tensors stay resident in the heap, so the default peak
depends on the allocation history. The model is therefore checked on runs with
MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0 (tensors above 64 KiB are mapped and
unmapped: RSS follows the live tensors; timings are slower and not used); the held-out settings
are also measured with the default allocator, and that difference is reported, not hidden.

The calibration settings (set "cal") fit the coefficients; the validation settings ("val") differ
in |b|, g, N, width, image size, depth, channels and set size, and are not used by the fit. The
The H200 replay-prototype anchors (bench/results/anchors_design_h200.json, CUDA allocator peaks) are compared as well, and
so is every GPU replay record of this code in bench/results/matching_*.json (none yet).
Writes ``--out`` (default bench/results/memory_model_cpu) .json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import sys
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from distill import estimate as est  # noqa: E402

FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
TOLERANCE = 0.25

# name -> (set, width, depth, image size, channels, |b|, g, N, n images)
SETTINGS = {
    "C1": ("cal", 32, 3, 32, 3, 64, 64, 5, 500),
    "C2": ("cal", 64, 3, 32, 3, 128, 128, 5, 500),
    "C3": ("cal", 128, 3, 32, 3, 32, 32, 5, 500),
    "C4": ("cal", 64, 3, 32, 3, 32, 32, 5, 500),
    "V1": ("val", 64, 3, 32, 3, 128, 32, 5, 500),      # 4 groups of 32
    "V2": ("val", 64, 3, 32, 3, 64, 64, 20, 500),      # longer unroll
    "V3": ("val", 128, 3, 32, 3, 64, 64, 10, 500),
    "V4": ("val", 96, 3, 32, 3, 96, 48, 5, 500),       # 2 groups, odd width
    "V5": ("val", 32, 3, 32, 3, 256, 256, 5, 2000),    # bigger set and group
    "V6": ("val", 32, 4, 64, 3, 32, 32, 5, 500),       # Tiny ImageNet shape, depth 4
    "V7": ("val", 128, 3, 32, 3, 128, 128, 3, 500),
    "V8": ("val", 64, 3, 28, 1, 64, 64, 5, 500),       # Fashion-MNIST shape
    "V9": ("val", 32, 2, 8, 1, 50, 25, 10, 100),       # quickstart shape (digits)
}

# bench/results/anchors_design_h200.json: replay prototype, one H200, CIFAR-10 shape (ConvNet-BN width 128, 32×32×3),
# fp32, peak GiB of the CUDA allocator; |b| = g, n = 2500 images (5000 for 5000 × 80).
GPU_ANCHORS = [(125, 55, 2500, 1.18), (500, 55, 2500, 3.9), (1000, 55, 2500, 7.8),
               (2500, 55, 2500, 18.4), (5000, 80, 5000, 36.3)]
GPU_CALIBRATION = (125, 55)  # the anchor that sets COEFFICIENTS["cuda"].runtime_bytes


def _bench():
    spec = importlib.util.spec_from_file_location("bench_matching", os.path.join(HERE, "matching.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shape_of(row: tuple) -> est.MatchingShape:
    _, width, depth, size, channels, batch, group, steps, n = row
    net = est.Network(name="convnet", in_channels=channels, num_classes=10, image_size=size,
                      width=width, depth=depth, norm="batch")
    return est.MatchingShape(net=net, batch=batch, group=group, steps=steps, n_images=n,
                             n_matched=n, n_learnable=0, joint=False)


def known_in_step(shape: est.MatchingShape, device: str) -> float:
    """Terms of the model that the bench's step allocates, except activations and runtime:
    θ_1…θ_N and the in-step P vectors (θ_0, the target and the weights exist before), and the
    image gradient."""
    m = est.memory(shape, device)
    return m["parameter vectors"] - 3 * shape.params * shape.dtype_bytes + m["image gradient"]


def predicted_delta(shape: est.MatchingShape, device: str = "cpu") -> float:
    m = est.memory(shape, device)
    return known_in_step(shape, device) + m["activations"] + m["runtime"]


def measure(names: list[str], method: str, allocator: str) -> dict[str, dict]:
    bench = _bench()
    saved = {k: os.environ.get(k) for k in FIXED_MALLOC}
    if allocator == "fixed":
        os.environ.update(FIXED_MALLOC)
    else:
        for k in FIXED_MALLOC:
            os.environ.pop(k, None)
    out = {}
    try:
        for name in names:
            _, width, depth, size, channels, batch, group, steps, n = SETTINGS[name]
            spec = {"width": width, "depth": depth, "image_size": size, "channels": channels,
                    "classes": 10, "iters": 1, "warmup": 1, "dtype": "float32", "dsa": True,
                    "tf32": False, "seed": 0, "threads": 1, "method": method, "batch": batch,
                    "steps": steps, "device": "cpu", "group": group, "n_images": n}
            rec = bench.measure_isolated(spec)
            keep = ("status", "error", "peak_gib", "before_gib", "delta_gib", "s_per_iter",
                    "rss_probe")
            out[name] = {k: rec[k] for k in keep if k in rec}
            print(f"{name} ({allocator} malloc): {out[name]}", flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def fit(measured: dict[str, dict]) -> tuple[float, float]:
    """Least squares of Δ − known = runtime + c_act · (g·A·s) over the calibration settings."""
    xs, ys = [], []
    for name, row in SETTINGS.items():
        rec = measured.get(name)
        if row[0] != "cal" or not rec or rec.get("status") != "ok":
            continue
        shape = shape_of(row)
        xs.append(shape.group * est.network_facts(shape.net)[1] * shape.dtype_bytes)
        ys.append(rec["delta_gib"] * est.GIB - known_in_step(shape, "cpu"))
    if len(set(xs)) < 2:
        raise SystemExit("--fit needs at least two calibration settings with different g·A")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def compare(measured: dict[str, dict], default: dict[str, dict]) -> list[dict]:
    rows = []
    for name, row in SETTINGS.items():
        rec = measured.get(name)
        if rec is None:
            continue
        shape = shape_of(row)
        pred = predicted_delta(shape)
        r = {"name": name, "set": row[0], "width": row[1], "depth": row[2], "image": row[3],
             "channels": row[4], "batch": row[5], "group": row[6], "steps": row[7],
             "n": row[8], "predicted_gib": pred / est.GIB, "status": rec.get("status")}
        if rec.get("status") == "ok":
            r.update(measured_gib=rec["delta_gib"], peak_gib=rec["peak_gib"],
                     error=pred / (rec["delta_gib"] * est.GIB) - 1)
        d = default.get(name)
        if d and d.get("status") == "ok":
            r.update(default_gib=d["delta_gib"], default_error=pred / (d["delta_gib"] * est.GIB) - 1)
        rows.append(r)
    return rows


def compare_gpu() -> list[dict]:
    rows = []
    for batch, steps, n, peak in GPU_ANCHORS:
        net = est.Network(name="convnet", in_channels=3, num_classes=10, image_size=32,
                          width=128, depth=3, norm="batch")
        shape = est.MatchingShape(net=net, batch=batch, group=batch, steps=steps, n_images=n,
                                  n_matched=n, n_learnable=0, joint=False)
        pred = est.peak_bytes(shape, "cuda") / est.GIB
        rows.append({"batch": batch, "steps": steps, "n": n, "measured_gib": peak,
                     "predicted_gib": pred, "error": pred / peak - 1,
                     "role": "sets the cuda runtime constant" if (batch, steps) == GPU_CALIBRATION
                     else "held out"})
    return rows


def compare_gpu_records(results_dir: str = os.path.join(HERE, "results")) -> list[dict]:
    """This code's own GPU measurements, when bench/matching.py has recorded any
    (bench/results/matching_*.json, replay on cuda): the CUDA allocator's peak against the model
    (the set, its gradient, θ vectors, one group's activations, runtime; the bench's extra probe
    vector of n·D floats is added to the prediction)."""
    import glob

    rows = []
    for path in sorted(glob.glob(os.path.join(results_dir, "matching_*.json"))):
        with open(path) as f:
            doc = json.load(f)
        for r in doc.get("records", []):
            if (r.get("method") != "replay" or r.get("status") != "ok"
                    or not str(r.get("device", "")).startswith("cuda")):
                continue
            net = est.Network(name="convnet", in_channels=r["channels"], num_classes=r["classes"],
                              image_size=r["image_size"], width=r["width"], depth=r["depth"],
                              norm="batch")
            shape = est.MatchingShape(net=net, batch=r["batch"], group=r["group"],
                                      steps=r["steps"], n_images=r["n_images"],
                                      n_matched=r["n_images"], n_learnable=0, joint=False)
            probe = r["n_images"] * shape.image_numel * 4
            pred = (est.peak_bytes(shape, "cuda") + probe) / est.GIB
            rows.append({"file": os.path.relpath(path, ROOT), "machine": doc.get("machine"),
                         "batch": r["batch"], "group": r["group"], "steps": r["steps"],
                         "n": r["n_images"], "width": r["width"], "measured_gib": r["peak_gib"],
                         "predicted_gib": pred, "error": pred / r["peak_gib"] - 1})
    return rows


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.1f}%"


def write(out: str, doc: dict) -> None:
    with open(out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    rows, gpu = doc["rows"], doc["gpu"]
    lines = [f"# Matching-step memory model vs measured peaks: {doc['machine']}, torch "
             f"{doc['torch']}, {doc['date'][:16].replace('T', ' ')} UTC", "",
             f"Measured by `{doc['command']}`" + (
                 f"; compared by `{doc['compared_by']}`" if doc["compared_by"] != doc["command"]
                 else ""), "",
             "Model: distill/estimate.py (`COEFFICIENTS`: activation "
             f"{doc['coefficients']['cpu']['activation']}, cpu runtime "
             f"{est.fmt_bytes(doc['coefficients']['cpu']['runtime_bytes'])}, cuda runtime "
             f"{est.fmt_bytes(doc['coefficients']['cuda']['runtime_bytes'])}). Measured: "
             f"bench/matching.py, method {doc['method']}, one subprocess per setting, 1 torch "
             "thread, DSA on, 32-bit floats. Δ = peak RSS during 2 iterations − RSS before the "
             "first (what the step allocates; the ~0.75 GiB of interpreter, torch and problem "
             "tensors before it is not part of the model). 'fixed malloc' = "
             "MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0, so RSS follows live "
             "tensors; 'default malloc' = glibc's adaptive threshold, which keeps freed tensors "
             "resident. cal = used by `--fit`; val = held out.", ""]
    if doc.get("fit"):
        lines += [f"Least-squares fit of the cal settings: activation {doc['fit']['activation']:.2f}, "
                  f"runtime {est.fmt_bytes(doc['fit']['runtime_bytes'])}.", ""]
    lines += ["| setting | set | width | depth | image | C | \\|b\\| | g | N | n | predicted Δ GiB "
              "| measured Δ GiB (fixed malloc) | error | measured Δ GiB (default malloc) | error |",
              "|" + " --- |" * 15]
    for r in rows:
        meas = f"{r['measured_gib']:.3f}" if "measured_gib" in r else r["status"]
        dflt = f"{r['default_gib']:.3f}" if "default_gib" in r else ""
        lines.append(f"| {r['name']} | {r['set']} | {r['width']} | {r['depth']} | {r['image']} "
                     f"| {r['channels']} | {r['batch']} | {r['group']} | {r['steps']} | {r['n']} "
                     f"| {r['predicted_gib']:.3f} | {meas} | {_pct(r.get('error'))} | {dflt} "
                     f"| {_pct(r.get('default_error'))} |")
    val = [abs(r["error"]) for r in rows if r["set"] == "val" and "error" in r]
    if val:
        worst = max(val)
        lines += ["", f"Held-out settings (fixed malloc): largest |error| {100 * worst:.1f}% "
                      f"({'within' if worst <= TOLERANCE else 'OUTSIDE'} the "
                      f"{100 * TOLERANCE:.0f}% target)."]
    dval = [abs(r["default_error"]) for r in rows if r["set"] == "val" and "default_error" in r]
    if dval:
        lines.append(f"With glibc's default allocator the largest |error| is {100 * max(dval):.1f}%"
                     " (the allocator's retention, not the step's tensors).")
    lines += ["", "H200 replay-prototype anchors (one H200, CIFAR-10 shape, width 128, "
              "fp32, CUDA allocator peak; the prototype, not this code):", "",
              "| \\|b\\| = g | N | n | measured GiB | predicted GiB | error | role |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in gpu:
        lines.append(f"| {r['batch']} | {r['steps']} | {r['n']} | {r['measured_gib']} | "
                     f"{r['predicted_gib']:.2f} | {_pct(r['error'])} | {r['role']} |")
    own = doc.get("gpu_own", [])
    lines += ["", "This code on a GPU (bench/matching.py records in bench/results/matching_*.json, "
              "CUDA allocator peak):", ""]
    if not own:
        lines.append("none recorded yet (`bash bench/gpu_checks.sh matching` measures them; copy "
                     "its matching_gpu.json into bench/results/ and rerun this script with "
                     "--from-json).")
    else:
        lines += ["| file | machine | width | \\|b\\| | g | N | n | measured GiB | predicted GiB "
                  "| error |", "|" + " --- |" * 10]
        for r in own:
            lines.append(f"| {r['file']} | {r['machine']} | {r['width']} | {r['batch']} | "
                         f"{r['group']} | {r['steps']} | {r['n']} | {r['measured_gib']:.2f} | "
                         f"{r['predicted_gib']:.2f} | {_pct(r['error'])} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}.json and {out}.md")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=sorted(SETTINGS), default=None)
    p.add_argument("--fit", action="store_true", help="print the calibration fit")
    p.add_argument("--method", default="replay", help="bench/matching.py method to measure")
    p.add_argument("--no-default-malloc", action="store_true",
                   help="skip the held-out runs with glibc's default allocator")
    p.add_argument("--from-json", default=None, help="reuse the measurements of a previous run")
    p.add_argument("--out", default=os.path.join(HERE, "results", "memory_model_cpu"))
    args = p.parse_args(argv)
    names = args.only or list(SETTINGS)
    if args.from_json:
        with open(args.from_json) as f:
            old = json.load(f)
        measured, default, method = old["measured"], old["default_malloc"], old["method"]
        command, machine, torch_version = old["command"], old["machine"], old["torch"]
        date = old["date"]
    else:
        import torch

        method = args.method
        measured = measure(names, method, "fixed")
        held_out = [n for n in names if SETTINGS[n][0] == "val"]
        default = {} if args.no_default_malloc else measure(held_out, method, "default")
        command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__), ROOT)]
                             + (argv if argv is not None else sys.argv[1:]))
        machine, torch_version = _bench().machine(torch.device("cpu"), 1), torch.__version__
        date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    compared = shlex.join(["python", os.path.relpath(os.path.abspath(__file__), ROOT)]
                          + (argv if argv is not None else sys.argv[1:]))
    doc = {"command": command, "compared_by": compared, "machine": machine, "torch": torch_version, "method": method,
           "date": date,
           "coefficients": {k: vars(v) for k, v in est.COEFFICIENTS.items()},
           "settings": SETTINGS, "measured": measured, "default_malloc": default}
    if args.fit:
        slope, intercept = fit(measured)
        doc["fit"] = {"activation": slope / 1.0, "runtime_bytes": intercept}
        print(f"fit: activation {slope:.3f} (words per conv-output element and sample), "
              f"runtime {est.fmt_bytes(intercept)}")
    doc["rows"], doc["gpu"] = compare(measured, default), compare_gpu()
    doc["gpu_own"] = compare_gpu_records()
    write(args.out, doc)


if __name__ == "__main__":
    main()
