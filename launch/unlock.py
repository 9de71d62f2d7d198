"""``selmatch unlock --config F [overrides]``: remove a run directory's lock that no command holds.

A command that ends in any way releases its lock (on a local disk the kernel does, even after
SIGKILL), so this is for what nothing else can judge: a lock on an object store, on a filesystem
without flock, or one that names a process of another machine on a filesystem whose locks may
not reach it. On a local path a lock that a live process holds is never removed (the error
names it); elsewhere the lock is removed on the user's word that its holder is gone.
"""

from __future__ import annotations

import argparse

from distill.config_io import load_config
from distill.lock import unlock


def cmd_unlock(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides)
    print(unlock(cfg.run_dir))
    return 0
