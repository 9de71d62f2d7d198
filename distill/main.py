"""SelMatch distillation entry point.

    accelerate launch distill/main.py --config configs/cifar10_ipc250.yaml        # GPU(s)
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml \\
        distill/main.py --config configs/quickstart.yaml                           # 2 CPU ranks
    python distill/main.py --config configs/quickstart.yaml [--resume]            # one process
    selmatch distill --config configs/quickstart.yaml [--resume]                  # same

Reads the experts and scores of ``run_dir``, selects the initial set (``select.init``), saves it as
``synset/<method>_init.pt``, distills D_distill by trajectory matching, checkpoints every
``distill.checkpoint_every`` iterations to ``checkpoints/<method>.pt`` and saves the result as
``synset/<method>.pt`` (selmatch, mtt or merge). Metrics go to ``logs/distill_<method>.jsonl``.

With R ranks, each rank computes a contiguous block of every student step's |b|/g batch-norm
groups (``distill.bn_group``); the result is the same for any R, so use g <= |b|/R or some ranks
idle. Ranks' states are compared every ``distill.check_every`` iterations. docs/distributed.md
has the collectives, the memory/time scaling and every launch recipe.
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a script: keep distill/ itself off sys.path (module names)
    import os
    import sys

    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import logging

from distill.config_io import load_config
from distill.distiller import run_distill
from distill.prerequisites import require_stages
from distill.runtime import Runtime, launched_rank
from launch.exits import arguments_text, run_guarded


def run(rt: Runtime, config: str, overrides: list[str], *, resume: bool = False) -> int:
    """Load the config, distill, and tear the process group down once: with a barrier when
    every rank got to the end, at once when this one raised (Runtime.close)."""
    ok = False
    try:
        run_distill(load_config(config, overrides), resume=resume, runtime=rt)
        ok = True
    finally:
        rt.close(ok=ok)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SelMatch distillation (trajectory matching)")
    parser.add_argument("--config", required=True, help="YAML config (path or fsspec URL)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is present")
    args, overrides = parser.parse_known_args(argv)

    rank = launched_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")

    def work() -> int:
        # bad input is found before the process group exists, the same way on every rank
        require_stages(load_config(args.config, overrides), "distill")
        rt = Runtime.create(cpu=True if args.cpu else None)
        return run(rt, args.config, overrides, resume=args.resume)

    # under a launcher, bad input (exit 2) is reported by rank 0 alone: every rank reads the same
    # config and run directory and fails alike; other failures are reported by each failing rank
    return run_guarded("distill" if rank == 0 else f"distill (rank {rank})", work,
                       arguments=arguments_text(args.config, overrides),
                       quiet_input_errors=rank != 0)  # exit statuses: launch/exits.py


def cmd_distill(args, overrides: list[str]) -> int:
    """``selmatch distill``: the same as running this file (one process, or one rank per process
    under ``accelerate launch -m launch.cli distill``: the group is torn down here too)."""
    return run(Runtime.create(), args.config, overrides, resume=args.resume)


if __name__ == "__main__":
    raise SystemExit(main())
