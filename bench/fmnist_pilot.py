"""Before the Fashion-MNIST comparison: how do the rows' ranking and the spread depend on the
evaluation epochs and the distillation iterations, and does the compiled path pay on this CPU?

    python bench/fmnist_pilot.py --run_dir runs/fmnist_pilot      # ~1 h on one core

One repetition seed of configs/fmnist_cpu.yaml (IPC 50, every row of the paper's comparison, 2
evaluation networks per row) is run by ``selmatch run``'s own code for each budget in turn, in
one run directory, so each step redoes only what the budget changes: the evaluations when
``eval.epochs`` changes, the distillations (continued from their checkpoints) when
``distill.iterations`` grows. After each step the report's numbers are kept. Then two fresh
processes distil the SelMatch set for the same iterations, eager and compiled, and their wall
times are compared (the compiled path pays only if its speed-up outweighs its compile time).
Writes ``bench/results/fmnist_pilot.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (distillation iterations, evaluation epochs, rows); None = every row of the paper's comparison
STEPS = [(100, 50, None), (100, 100, None), (100, 200, None), (300, 100, None)]


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if ra.std() and rb.std() else float("nan")


def timed_distill(config: str, run_dir: str, iterations: int, compile_: str) -> dict:
    """``python distill/main.py`` in a fresh process on a copy of the experts (scores made by
    ``selmatch scores``)."""
    cmd = [sys.executable, "distill/main.py", "--config", config, "--run_dir", run_dir,
           "--seeds", "null", "--distill.iterations", str(iterations),
           "--distill.compile", compile_, "--distill.log_every", str(iterations)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    notes = [ln for ln in proc.stderr.splitlines() if "compil" in ln.lower()]
    return {"compile": compile_, "iterations": iterations, "wall_s": round(wall, 1),
            "log": notes[-3:]}


def main() -> None:
    import logging

    from distill.config_io import load_config
    from launch.pipeline import run_pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fmnist_cpu.yaml")
    p.add_argument("--run_dir", default="runs/fmnist_pilot")
    p.add_argument("--experts_from", default=None,
                   help="a run directory whose experts/ (same settings) to copy instead of training")
    p.add_argument("--out", default=os.path.join(HERE, "results", "fmnist_pilot"))
    p.add_argument("--skip_timing", action="store_true")
    args = p.parse_args()
    os.makedirs(args.run_dir, exist_ok=True)
    if args.experts_from and not os.path.exists(os.path.join(args.run_dir, "experts")):
        shutil.copytree(os.path.join(args.experts_from, "experts"),
                        os.path.join(args.run_dir, "experts"))
    t_start = time.perf_counter()
    steps = []
    for iterations, epochs, rows in STEPS:
        cfg = load_config(args.config, {"run_dir": args.run_dir, "seeds": None,
                                        "distill.iterations": iterations,
                                        "eval.epochs": epochs, "eval.methods": rows})
        t0 = time.perf_counter()
        run_pipeline(cfg, workers=0)
        with open(os.path.join(args.run_dir, "results.json")) as f:
            res = json.load(f)
        steps.append({"iterations": iterations, "epochs": epochs,
                      "seconds": round(time.perf_counter() - t0, 1),
                      "rows": {n: {"mean": r["mean"], "std": r["std"], "values": r["values"]}
                               for n, r in res["methods"].items()},
                      "window": {"betas": res["window"]["betas"],
                                 "val_accuracy": res["window"]["val_accuracy"],
                                 "chosen": res["window"]["best_beta"]} if res["window"] else None})
        print(json.dumps(steps[-1]), flush=True)
        _write(args, steps, [], t_start)  # kept after every step: a crash loses nothing
    timing = []
    if not args.skip_timing:
        for compile_ in ("off", "on"):
            tmp = f"{args.run_dir}_timing_{compile_}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            shutil.copytree(os.path.join(args.run_dir, "experts"), os.path.join(tmp, "experts"))
            subprocess.run([sys.executable, "-m", "launch.cli", "scores", "--config", args.config,
                            "--run_dir", tmp], cwd=ROOT, check=True, capture_output=True)
            timing.append(timed_distill(args.config, tmp, STEPS[0][0], compile_))
            print(json.dumps(timing[-1]), flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
    _write(args, steps, timing, t_start)


def _write(args, steps: list, timing: list, t_start: float) -> None:
    result = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
              "config": args.config, "steps": steps, "timing": timing,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "seconds": round(time.perf_counter() - t_start, 1)}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    write_md(result, args.out + ".md")


def write_md(result: dict, path: str) -> None:
    steps = result["steps"]
    names = list(steps[0]["rows"])
    head = [f"it {s['iterations']}, ep {s['epochs']}" for s in steps]
    lines = ["# Fashion-MNIST pilot: the ranking against the budgets", "",
             f"`{result['command']}` ({result['date']}, {result['machine']}; "
             f"{result['seconds'] / 60:.0f} min). One seed, IPC 50, 2 evaluation networks per "
             "row: test accuracy (%), mean ± std of the 2, and the row's rank in its column.", "",
             "| row | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(steps)]
    for n in names:
        cells = []
        for s in steps:
            r = s["rows"].get(n)
            if r is None:
                cells.append("–")
                continue
            order = sorted(s["rows"], key=lambda m: -s["rows"][m]["mean"])
            cells.append(f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} (#{order.index(n) + 1})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Rank correlation (Spearman) between consecutive columns over the rows both "
              "have:", ""]
    for a, b in zip(steps, steps[1:]):
        common = [n for n in a["rows"] if n in b["rows"]]
        rho = spearman([a["rows"][n]["mean"] for n in common], [b["rows"][n]["mean"] for n in common])
        lines.append(f"- it {a['iterations']} ep {a['epochs']} → it {b['iterations']} ep "
                     f"{b['epochs']}: {rho:.2f} over {len(common)} rows")
    lines += ["", "Wall time per step (s): " + ", ".join(f"{s['seconds']:.0f}" for s in steps)]
    if result["timing"]:
        lines += ["", "| distillation | iterations | wall (fresh process) |", "| --- | --- | --- |"]
        lines += [f"| compile {t['compile']} | {t['iterations']} | {t['wall_s']} s |"
                  for t in result["timing"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
