"""Seconds per iteration of the real distillation loop, to set beside bench/matching.py's figure.

    python bench/distill_speed.py --out bench/results/distill_speed_gpu            # CUDA: the
        # CIFAR-10 IPC 250 shape (ConvNet-128, 32×32×3, |b| 125, N 55) on data.name: synthetic
    python bench/distill_speed.py --smoke --out /tmp/ds                           # CPU check

The benchmark times one matching call on prepared inputs; the loop around it also samples an
expert segment, moves θ*_t and θ*_{t+M} to the device, builds and ships the plan, checks for
divergence, steps two optimisers and logs. If the loop's s/iteration is well above the benchmark's,
something in it waits on the host that the benchmark does not. This script trains two short
experts on generated CIFAR-shaped data (in-process, no Ray), then runs ``python distill/main.py``
(the entry point ``accelerate launch`` runs) for ``--iterations`` with ``log_every 1`` and reads
the per-iteration seconds from ``logs/distill_selmatch.jsonl``. The first ``--skip`` iterations
(compilation, CUDA graph recording) are left out of the median. With ``--bench FILE.json`` the
matching benchmark's fast row of the same shape is quoted beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPE = ["--data.name", "synthetic", "--data.root", "null",
         "--data.options", "{num_classes: 10, per_class: 500, test_per_class: 10, "
                           "image_size: 32, channels: 3}",
         "--scores.kind", "forgetting", "--scores.file", "null", "--select.beta", "0.2",
         "--experts.num_experts", "2", "--experts.epochs", "4", "--distill.max_start_epoch", "2",
         "--distill.log_every", "1", "--distill.checkpoint_every", "1000",
         # timing only: the images' learning rate does not change the work of an iteration, and
         # a small one keeps generated data from tripping the divergence guard
         "--distill.lr_images", "1"]
SMOKE = ["--data.options", "{num_classes: 3, per_class: 30, test_per_class: 5, image_size: 8, "
                           "channels: 1}",
         "--model.width", "8", "--select.ipc", "10", "--distill.batch_syn", "10",
         "--distill.syn_steps", "3", "--experts.epochs", "3", "--distill.max_start_epoch", "1"]


def run(cmd: list[str], env: dict) -> None:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "it/s]" not in ln
             and "s/it]" not in ln]
    keep = [ln for ln in lines[:-15] if "matching step" in ln or "compiled" in ln]
    print("\n".join(keep + lines[-15:]), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[2]} exited with {proc.returncode}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--skip", type=int, default=5, help="first iterations left out of the median")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU check")
    p.add_argument("--bench", default=None, help="bench/matching.py JSON to compare with")
    p.add_argument("--out", required=True, help="results path without extension")
    args, extra = p.parse_known_args()  # the rest: dotted overrides, e.g. --distill.compile off
    run_dir = tempfile.mkdtemp(prefix="distill_speed_")
    overrides = ["--config", "configs/cifar10_ipc250.yaml", "--run_dir", run_dir, *SHAPE,
                 *(SMOKE if args.smoke else []), "--distill.iterations", str(args.iterations),
                 *extra]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    py = sys.executable
    t0 = time.perf_counter()
    run([py, "-m", "launch.cli", "experts", "--workers", "0", *overrides], env)
    run([py, "-m", "launch.cli", "scores", *overrides], env)
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run([py, "distill/main.py", *overrides], env)
    distill_s = time.perf_counter() - t0
    with open(os.path.join(run_dir, "logs", "distill_selmatch.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    seconds = [r["seconds"] for r in records if "seconds" in r]
    steady = seconds[args.skip:] or seconds
    result = {"command": " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
              "overrides": overrides[4:], "iterations": len(seconds),
              "first_iteration_s": seconds[0] if seconds else None,
              "median_s_per_iter": statistics.median(steady) if steady else None,
              "seconds_per_iteration": seconds, "prepare_s": prep_s, "distill_wall_s": distill_s,
              "peak_mem_mib": max((r.get("peak_rss_mib", r.get("cuda_peak_allocated_mib", 0))
                                   for r in records), default=None)}
    if args.bench and os.path.exists(args.bench):
        with open(args.bench) as f:
            bench = json.load(f)
        rows = [r for r in bench["records"] if r["method"] == "fast" and r["status"] == "ok"
                and (r["batch"], r["steps"]) == (125, 55) and r.get("precision") == "tf32"]
        if rows:
            result["bench_fast_s_per_iter"] = rows[0]["s_per_iter"]
            result["loop_over_bench"] = result["median_s_per_iter"] / rows[0]["s_per_iter"]
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "seconds_per_iteration"}, indent=1))


if __name__ == "__main__":
    main()
