"""Start gloo ranks on CPU for a test: spawn (a fork after torch's thread pools are up can hang),
one process per rank, a per-run port, a deadline, and no rank left running afterwards.

    results = run_ranks(worker, world=2, args=(out_dir, ...), timeout=300)

``worker(rank, world, port, *args)`` sets up its process group through ``Runtime.create`` (via
:func:`rank_env`) and writes its results to a file the test reads back.
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> None:
    """What torchrun/accelerate would set, for a CPU rank with one intra-op thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def run_ranks(worker, *, world: int, args: tuple, timeout: float) -> None:
    ctx = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world}-rank run did not finish in {timeout:.0f} s")
    finally:
        for proc in ctx.processes:  # a hung rank (e.g. waiting in a collective) is killed
            if proc.is_alive():
                proc.terminate()
