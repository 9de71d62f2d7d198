"""Evaluation runs in parallel: every (set, run) pair is an independent Ray task.

    selmatch evaluate --config F                   # local Ray, eval.num_cpus / num_gpus per run
    selmatch evaluate --config F --workers 0       # one run after another in this process
    selmatch evaluate --config F --ray-address auto --eval.num_gpus 0.5   # a cluster

The evaluation itself is distill/evaluate.py's :func:`~distill.evaluate.evaluate_sets`, the one
path every evaluation takes (the window search and the tune trials too, in-process); this
module only adds a runner that executes its jobs (:func:`~distill.evaluate.run_set`, run k of a
set seeded from (seed, k)) as Ray tasks. Where and in which order the runs execute does not
change them: each uses ``eval.num_cpus`` torch threads on Ray and in-process alike, and on CPU
the two give bitwise identical accuracies (tests/test_evaluate_parallel.py). Coverage and the
easy/hard split are computed in the driver from the per-run results. On a cluster the dataset
and each image set go to Ray's object store once; workers return one boolean per test sample.
"""

from __future__ import annotations

import functools
import logging

import torch
from tqdm.auto import tqdm

from distill.config import RunConfig
from distill.data import Dataset
from distill import evaluate as ev
from distill.evaluate import EvalResult, ImageSet, Job, Reference
from distill.runtime import device_for

log = logging.getLogger(__name__)

__all__ = ["ImageSet", "evaluate_sets", "num_gpus"]


def num_gpus(cfg: RunConfig) -> float:
    """eval.num_gpus, or 1 when this machine has CUDA and it is None (auto)."""
    if cfg.eval.num_gpus is not None:
        return cfg.eval.num_gpus
    return 1.0 if torch.cuda.is_available() else 0.0


def _task(cfg: RunConfig, ds: Dataset, images: ImageSet, run: int, epochs: int,
          gpus: float) -> torch.Tensor:
    """One run on a worker: the device is decided where it runs."""
    return ev.run_set(cfg, ds, images, run, epochs, device_for(gpus))


def evaluate_sets(cfg: RunConfig, ds: Dataset, sets: dict[str, ImageSet], *,
                  reference: Reference | None = None, workers: int | None = None,
                  ray_address: str | None = None, progress: bool = True) -> dict[str, EvalResult]:
    """``eval.runs`` runs of every set; ``workers=0`` in-process, else Ray tasks (at most
    ``workers`` at once; None: as many as Ray schedules)."""
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    gpus = num_gpus(cfg)
    runner = None if workers == 0 else functools.partial(_on_ray, gpus=gpus, workers=workers,
                                                         address=ray_address)
    return ev.evaluate_sets(cfg, ds, sets, reference=reference, runner=runner,
                            device=device_for(gpus), progress=progress)


def _on_ray(cfg: RunConfig, ds: Dataset, sets: dict[str, ImageSet], jobs: list[Job], *,
            gpus: float, workers: int | None, address: str | None,
            progress: bool = True) -> dict[tuple[str, int], torch.Tensor]:
    import ray

    from launch.ray_utils import init_ray, run_limited

    done: dict[tuple[str, int], torch.Tensor] = {}
    if not jobs:
        return done
    bar = tqdm(total=len(jobs), desc="eval runs", disable=not progress)
    started = init_ray(address)
    try:
        task = ray.remote(num_cpus=cfg.eval.num_cpus, num_gpus=gpus, max_retries=1)(_task)
        ds_ref = ray.put(ds)
        refs = {m: ray.put(s) for m, s in sets.items()}
        keys = {id(refs[m]): m for m in sets}

        def finished(args: tuple, correct: torch.Tensor) -> None:
            done[keys[id(args[2])], args[3]] = correct
            bar.update(1)

        run_limited(task, [(cfg, ds_ref, refs[m], k, epochs, gpus) for m, k, epochs in jobs],
                    finished, limit=workers)
    finally:
        bar.close()
        if started:
            ray.shutdown()
    return done
