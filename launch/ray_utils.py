"""Starting or joining Ray, in one place (``distill/`` never imports Ray).

``init_ray(None)`` starts a local Ray with this machine's cores; ``init_ray("auto")`` or
``init_ray("ray://head:10001")`` joins a running cluster (see launch/ray/cluster.yaml). When Ray is
already initialised (a test fixture, a notebook) it is reused and left running.
"""

from __future__ import annotations

import os


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Initialise Ray unless it already is; returns True when this call started it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    return True


def run_limited(task, calls: list[tuple], on_done, *, limit: int | None = None) -> None:
    """Submit ``task.remote(*args)`` for every ``args`` of ``calls``, at most ``limit`` running
    at once (None: all), and call ``on_done(args, result)`` in this process as each finishes
    (the order they finish in). The one queue loop of the Ray launchers."""
    import ray

    queue, running = list(calls), {}
    limit = limit or len(calls) or 1
    while queue or running:
        while queue and len(running) < limit:
            args = queue.pop(0)
            running[task.remote(*args)] = args
        finished, _ = ray.wait(list(running), num_returns=1)
        args = running.pop(finished[0])
        on_done(args, ray.get(finished[0]))
