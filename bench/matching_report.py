"""bench/matching.py's output: the table, the speed-ups and agreement lines, the machine line,
and the .json/.md files it writes (see bench/matching.py for what the columns measure).

    python bench/matching_report.py bench/results/matching_cpu_cpu_fast.json   # rewrite its .md

rewrites a record's markdown (and its speed-up and agreement lines) from the measured records in
its JSON, without measuring again."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone

import torch

from matching_probe import GIB

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.relpath(os.path.join(HERE, "matching.py"), os.path.dirname(HERE))

COLUMNS = ("target", "method", "path", "prec", "|b|", "N", "g", "n", "s/iter", "first s", "CPU s/iter",
           "peak GiB", "Δ GiB", "image-steps/s", "grad err", "host syncs")


def _cells(r: dict) -> list[str]:
    ok = r["status"] == "ok"
    path = r.get("path", "")
    if r.get("fallback"):
        path = f"FELL BACK TO EAGER: {r['fallback'][:80]}"
    return [r.get("target", "expert"), r["method"], path, r.get("precision", ""), str(r["batch"]), str(r["steps"]),
            str(r["group"]), str(r["n_images"]),
            f"{r['s_per_iter']:.3f} ± {r['s_std']:.3f}" if ok else r["status"],
            f"{r['first_s']:.1f}" if ok else "",
            f"{r['cpu_s_per_iter']:.3f}" if ok else "",
            f"{r['peak_gib']:.3f}" if "peak_gib" in r else "",
            f"{r['delta_gib']:.3f}" if "delta_gib" in r else "",
            f"{r['image_steps_per_s']:.0f}" if ok else "",
            f"{r['grad_err']:.1e}" if r.get("grad_err") is not None else "",
            str(r["host_syncs"]) if r.get("host_syncs") is not None else ""]


def row_text(r: dict) -> str:
    note = " ".join(x for x in (r.get("error"), r.get("note")) if x)
    return "  ".join(f"{c:>8}" for c in _cells(r)) + (f"  [{note}]" if note else "")


def table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in COLUMNS) + " | note |",
             "|" + " --- |" * (len(COLUMNS) + 1)]
    for r in records:
        note = " ".join(x for x in (r.get("error"), r.get("note")) if x).replace("|", "\\|")
        lines.append("| " + " | ".join(_cells(r)) + f" | {note} |")
    per_plan = [r for r in records if r.get("grad_errs")]
    if per_plan:
        lines += ["", "Image-gradient relative error against float64, per plan (timed iteration):",
                  "", "| target | method | \\|b\\| × N | " + " | ".join(
                      f"plan {i + 1}" for i in range(max(len(r["grad_errs"]) for r in per_plan)))
                  + " |", "|" + " --- |" * (3 + max(len(r["grad_errs"]) for r in per_plan))]
        lines += [f"| {r.get('target', 'expert')} | {r['method']} | {r['batch']} × {r['steps']} | "
                  + " | ".join(f"{e:.1e}" for e in r["grad_errs"]) + " |" for r in per_plan]
    return "\n".join(lines)


def speedups(records: list[dict]) -> list[str]:
    """fast vs eager replay and fast vs unrolled, per target, shape and precision."""
    ok = {(r["method"], r["batch"], r["steps"], r["group"], r.get("precision"),
           r.get("target", "expert")): r for r in records if r["status"] == "ok"}
    lines = []
    for (m, b, n, g, p, t), r in ok.items():
        if m != "fast" or r.get("fallback"):
            continue
        for other in ("replay", "unrolled"):
            o = ok.get((other, b, n, g, p, t))
            if o:
                lines.append(f"{t} target, {b}x{n} g{g} {p}: fast {o['s_per_iter'] / r['s_per_iter']:.2f}x "
                             f"faster than {'eager replay' if other == 'replay' else other} "
                             f"({r['s_per_iter']:.3f} vs {o['s_per_iter']:.3f} s/iter)")
    return lines


def agreement(records: list[dict]) -> str | None:
    """Max relative difference of each method against the eager replay over configs both ran
    (same plans, inputs and target)."""
    ok = {(r["method"], r["batch"], r["steps"], r["group"], r.get("precision"),
           r.get("target", "expert")): r for r in records if r["status"] == "ok"}
    worst: dict[str, dict[str, float]] = {}
    for (m, b, n, g, p, t), r in ok.items():
        ref = ok.get(("replay", b, n, g, p, t))
        if m == "replay" or ref is None:
            continue
        for cr, cu in zip(r["checks"], ref["checks"]):
            for k, v in cr.items():
                rel = abs(v - cu[k]) / max(abs(v), abs(cu[k]), 1e-30)
                worst.setdefault(m, {})[k] = max(worst.get(m, {}).get(k, 0.0), rel)
    if not worst:
        return None
    return "; ".join(f"{m} vs eager replay, same plans: max relative difference " +
                     ", ".join(f"{k} {v:.1e}" for k, v in w.items()) for m, w in worst.items())


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
    command = shlex.join(["python", SCRIPT] + sys.argv[1:])
    doc = {"command": command, "machine": machine(device, s["threads"]), "torch": torch.__version__,
           "python": platform.python_version(), "date": when.isoformat(timespec="seconds"),
           "load_average": load, "settings": s, "agreement": agreement(records),
           "speedups": speedups(records), "records": records}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for ext, text in ((".json", json.dumps(doc, indent=1)), (".md", _markdown(doc, s, device))):
        tmp = out + ext + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, out + ext)


def _markdown(doc: dict, s: dict, device: torch.device) -> str:
    mem = ("peak = max_memory_allocated; Δ = peak − allocated before the first step"
           if device.type == "cuda" else
           "peak = peak RSS during the steps (fresh process per row); Δ = peak − RSS before the "
           "first step")
    shape = (f"ConvNet-BN width {s['width']} depth {s['depth']}, {s['image_size']}×"
             f"{s['image_size']}×{s['channels']}, {s['classes']} classes, {s['dtype']}, "
             f"DSA {'on' if s['dsa'] else 'off'}, {s['warmup']} warm-up + {s['iters']} timed "
             f"iterations")
    text = (f"# Matching step: {doc['machine']}, torch {doc['torch']}, {doc['date']}\n\n"
            f"`{doc['command']}`\n\n{shape}. {mem}; s/iter is wall time, mean ± sd; first s = the "
            f"first iteration (with compilation for fast); CPU s/iter is the process's CPU time "
            f"(all threads); n = synthetic set size; g = BN group; prec = convolution precision; "
            f"grad err = median relative error of the image gradient against a float64 eager "
            f"replay of the same plans (target expert: 20 plain float64 SGD steps of the same "
            f"network from the start; offset: the start plus N(0, 0.01²) noise; a one-ulp change of "
            f"the start moves float32 by 1e-3 to 1e-2 on either path, bench/results/"
            f"precision_cpu.md); host syncs = CUDA host waits during one matching call (torch's "
            f"sync debug mode; 1 is the loss's start distance read once per iteration). Load average (1, 5, 15 min) at start {doc['load_average']['start']}"
            f", at end {doc['load_average'].get('end')}.\n\n{table(doc['records'])}\n")
    if doc["speedups"]:
        text += "\n" + "\n".join(f"- {line}" for line in doc["speedups"]) + "\n"
    if doc["agreement"]:
        text += f"\n{doc['agreement']}.\n"
    return text




def rewrite(path: str) -> None:
    """The .md (and the derived lines of the .json) of a record at ``path``, from its records."""
    with open(path) as f:
        doc = json.load(f)
    doc["speedups"], doc["agreement"] = speedups(doc["records"]), agreement(doc["records"])
    device = torch.device("cuda" if "no GPU" not in doc["machine"] else "cpu")
    out = path.removesuffix(".json")
    for ext, text in ((".json", json.dumps(doc, indent=1)),
                      (".md", _markdown(doc, doc["settings"], device))):
        with open(out + ext + ".tmp", "w") as f:
            f.write(text)
        os.replace(out + ext + ".tmp", out + ext)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        rewrite(arg)
        print(f"rewrote {arg.removesuffix('.json')}.md")
