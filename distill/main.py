"""SelMatch distillation entry point: the script ``accelerate launch`` runs.

    accelerate launch distill/main.py --config configs/cifar10_ipc250.yaml        # GPU(s)
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml \\
        distill/main.py --config configs/quickstart.yaml                           # 2 CPU ranks
    python distill/main.py --config configs/quickstart.yaml [--resume] [--force]  # one process
    selmatch distill --config configs/quickstart.yaml [--resume] [--force]        # same

Distils the set the config describes (selmatch, or mtt / random_partial from a random start,
merge in merge mode) from the experts and scores of ``run_dir``, starting from the window
search's choice unless ``select.init`` / ``select.beta`` pin the start. A missing or stale input
is named with the command that makes it; a result that is present and fresh is skipped unless
``--force``; ``--resume`` continues from ``checkpoints/<set>.pt``. Writes
``synset/<set>_init.pt`` (the start), ``synset/<set>.pt`` and ``logs/distill_<set>.jsonl``.

With R ranks, each rank computes a contiguous block of every student step's |b|/g batch-norm
groups (``distill.bn_group``); the result is the same for any R (to float tolerance: see
docs/distributed.md), so use g <= |b|/R or some ranks idle. Ranks' states are compared every
``distill.check_every`` iterations.

This file is only the script a launcher is pointed at: the distillation is launch/distillation.py's,
above the library; nothing imports this module.
"""

if __name__ == "__main__":
    import os
    import sys

    # run as a script: the checkout's root on sys.path instead of distill/ (module names)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    from launch.distillation import main

    raise SystemExit(main())
