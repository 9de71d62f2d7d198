"""Seconds per iteration of the real distillation loop, by launcher and rank count: the records
that ``selmatch estimate`` and the start-of-run estimate line take a run's time from
(distill/profiles.py picks the nearest record).

    python bench/loop_profile.py                          # quickstart: 1 rank, and 2 CPU ranks
    python bench/loop_profile.py --config configs/fmnist_cpu.yaml --ranks 1 \\
        --out bench/results/matching_cpu_loop_fmnist

Prepares the config's experts and scores in a temporary run directory (in-process), then for
each rank count runs the distillation entry point for ``--iterations`` with ``log_every 1``:
``python distill/main.py`` for one rank, ``accelerate launch --config_file
launch/accelerate/cpu_2proc.yaml distill/main.py`` (gloo) for two. The time of an iteration is
the loop's own record (``seconds`` in ``logs/distill_<set>.jsonl``: matching, optimiser steps and
the all-reduces; not checkpoints or start-up); the profile keeps the median after ``--skip``.
Writes ``<out>.json`` (a ``matching_*.json`` profile) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run(cmd: list[str], env: dict) -> None:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"exit {proc.returncode}: {' '.join(cmd)}")


def launcher_command(ranks: int, py: str) -> tuple[list[str], str]:
    if ranks == 1:
        return [py, "distill/main.py"], "python distill/main.py"
    if ranks == 2:
        accelerate = os.path.join(os.path.dirname(py), "accelerate")
        return ([accelerate, "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml",
                 "--main_process_port", "0", "distill/main.py"],
                "accelerate launch (cpu_2proc.yaml, gloo)")
    raise SystemExit(f"--ranks: 1 or 2 on a CPU machine, got {ranks}")


def main() -> None:
    from distill.config_io import load_config
    from distill.distiller import method_name
    from distill.estimate import shape_from_config
    from distill.profiles import _depth

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="first iterations left out of the median")
    p.add_argument("--out", default=os.path.join(HERE, "results", "matching_cpu_loop_quickstart"))
    p.add_argument("--run_dir", default=None,
                   help="reuse (or make) the experts and scores of this run directory; kept "
                        "(default: a temporary one, removed)")
    args, extra = p.parse_known_args()  # the rest: dotted overrides of the config
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="loop_profile_")
    overrides = ["--config", args.config, "--run_dir", run_dir, "--distill.log_every", "1",
                 "--distill.checkpoint_every", str(10 * args.iterations),
                 "--distill.iterations", str(args.iterations), *extra]
    cfg = load_config(args.config, overrides[2:])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    py = sys.executable
    run([py, "-m", "launch.cli", "experts", "--workers", "0", *overrides], env)
    run([py, "-m", "launch.cli", "scores", *overrides], env)
    records = []
    for ranks in args.ranks:
        cmd, launcher = launcher_command(ranks, py)
        load = os.getloadavg()[0]
        run([*cmd, *overrides], env)
        log = os.path.join(run_dir, "logs", f"distill_{method_name(cfg)}.jsonl")
        with open(log) as f:
            seconds = [json.loads(line)["seconds"] for line in f if line.strip()]
        os.remove(log)
        ckpt = os.path.join(run_dir, "checkpoints", f"{method_name(cfg)}.pt")
        if os.path.exists(ckpt):
            os.remove(ckpt)
        steady = seconds[args.skip:] or seconds
        shape = shape_from_config(cfg, ranks=ranks, device="cpu")
        net = shape.net
        records.append({
            "method": "fast" if shape.compiled else "replay", "device": "cpu",
            "width": net.width, "depth": _depth(net), "image_size": net.image_size,
            "channels": net.in_channels, "classes": net.num_classes, "dtype": "float32",
            "dsa": shape.dsa, "batch": shape.batch, "group": shape.group, "steps": shape.steps,
            "n_images": shape.n_images, "ranks": ranks, "launcher": launcher,
            "threads": cfg.distill.num_threads, "status": "ok",
            "s_per_iter": statistics.median(steady),
            "s_std": statistics.pstdev(steady) if len(steady) > 1 else 0.0,
            "iterations": len(seconds), "skipped": min(args.skip, len(seconds)),
            "load_1min": round(load, 2)})
        print(json.dumps(records[-1]), flush=True)
    if args.run_dir is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU used"
    import torch

    doc = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
           "machine": machine, "torch": torch.__version__,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "kind": "distillation loop", "records": records}
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# Distillation loop, seconds per iteration: {machine}", "",
             f"`{doc['command']}` ({doc['date']}, torch {doc['torch']})", "",
             "Median of the loop's per-iteration `seconds` after the first "
             f"{args.skip}; the 1-minute load average when each launch started.", "",
             "| launcher | ranks | \\|b\\| | g | N | s/iter (median) | sd | load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['launcher']} | {r['ranks']} | {r['batch']} | {r['group']} | {r['steps']} "
              f"| {r['s_per_iter']:.3f} | {r['s_std']:.3f} | {r['load_1min']} |" for r in records]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
