"""Expert-training throughput: expert-epochs per second with 1 worker vs N Ray workers.

    python bench/experts_throughput.py                         # Fashion-MNIST subset, 1 and 2 workers
    python bench/experts_throughput.py --workers 1 2 4 --experts 8 --epochs 3

Each configuration trains the same experts from scratch in a fresh temporary run directory
(``--workers 0`` is the in-process path without Ray). Every expert task uses
``experts.num_cpus`` threads (1 by default), so N workers use N cores. Prints a table and writes
it, with the machine and the command, to bench/results/experts_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

from distill.config_io import from_dict
from launch.experts import run_experts
from launch.ray_utils import init_ray

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=os.path.join(HERE, "results", "experts_throughput"))
    args = p.parse_args()

    rows = []
    ray_started = False
    for workers in args.workers:
        if workers > 0 and not ray_started:
            init_ray(num_cpus=max(args.workers))
            ray_started = True
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = from_dict({
                "run_dir": run_dir,
                "data": {"name": args.dataset, "train_per_class": args.train_per_class},
                "model": {"name": "convnet", "width": args.width},
                "experts": {"num_experts": args.experts, "epochs": args.epochs, "num_cpus": 1},
                "select": {"ipc": 1},
                "distill": {"max_start_epoch": 1, "expert_epochs": 1},
            })
            t0 = time.perf_counter()
            run_experts(cfg, workers=workers, progress=False)
            seconds = time.perf_counter() - t0
        rate = args.experts * args.epochs / seconds
        rows.append({"workers": workers, "seconds": round(seconds, 2),
                     "expert_epochs_per_s": round(rate, 3)})
        label = "in-process (no Ray)" if workers == 0 else f"Ray, {workers} worker(s)"
        print(f"{label:>22}: {seconds:7.2f} s  {rate:7.3f} expert-epochs/s", flush=True)

    base = next((r for r in rows if r["workers"] == 1), rows[0])
    for r in rows:
        r["speedup_vs_1_worker"] = round(r["expert_epochs_per_s"] / base["expert_epochs_per_s"], 2)
    record = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU"
        if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "setup": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(f"# Expert throughput ({record['machine']}, torch {record['torch']}, {record['date']})\n\n")
        f.write(f"`{record['command']}`: {args.experts} experts x {args.epochs} epochs, "
                f"{args.dataset} ({args.train_per_class}/class), ConvNet width {args.width}.\n\n")
        f.write("| workers | seconds | expert-epochs/s | speed-up vs 1 worker |\n| --- | --- | --- | --- |\n")
        for r in rows:
            w = "0 (in-process)" if r["workers"] == 0 else str(r["workers"])
            f.write(f"| {w} | {r['seconds']} | {r['expert_epochs_per_s']} | {r['speedup_vs_1_worker']} |\n")
    print(f"wrote {args.out}.json and .md")


if __name__ == "__main__":
    main()
