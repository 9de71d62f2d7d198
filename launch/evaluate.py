"""Evaluation runs in parallel: every (method, run) pair is an independent Ray task.

    selmatch evaluate --config F                   # local Ray, eval.num_cpus / num_gpus per run
    selmatch evaluate --config F --workers 0       # one run after another in this process
    selmatch evaluate --config F --ray-address auto --eval.num_gpus 0.5   # a cluster

Run k of a method trains a fresh network seeded from (seed, k) (distill.evaluate.run_correct),
so where and in which order the runs execute does not change them: each uses ``eval.num_cpus``
torch threads on Ray and in-process alike, and on CPU the two give bitwise identical accuracies
(tests/test_evaluate_parallel.py). Coverage and the easy/hard split are computed here, in the
driver, from the per-run results. On a cluster the dataset and each image set go to Ray's object
store once; workers return one boolean per test sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from distill.config import RunConfig
from distill.data import Dataset
from distill.evaluate import EvalResult, Reference, config_epochs, coverage_of, run_correct, summarize
from distill.runtime import cpu_threads, device_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSet:
    """What one method's evaluation trains on, with the row's augmentation and repetition seed
    (None: ``eval.augment`` or combined, and the run's seed)."""

    images: torch.Tensor
    labels: torch.Tensor
    is_distilled: torch.Tensor | None
    augment: str | None = None
    seed: int | None = None

    def augment_in(self, cfg: RunConfig) -> str:
        return self.augment or cfg.eval.augment or "combined"


def num_gpus(cfg: RunConfig) -> float:
    """eval.num_gpus, or 1 when this machine has CUDA and it is None (auto)."""
    if cfg.eval.num_gpus is not None:
        return cfg.eval.num_gpus
    return 1.0 if torch.cuda.is_available() else 0.0


def run_task(cfg: RunConfig, ds: Dataset, images: ImageSet, run: int, epochs: int,
             gpus: float) -> torch.Tensor:
    """One evaluation run (in this process or on a Ray worker): the test samples it gets right."""
    device = device_for(gpus)
    ev = cfg.eval
    with cpu_threads(ev.num_cpus):
        return run_correct(images.images, images.labels, ds, run=run, model=ev.model,
                           epochs=epochs, augment=images.augment_in(cfg),
                           is_distilled=images.is_distilled, lr=ev.lr, momentum=ev.momentum,
                           weight_decay=ev.weight_decay, batch_size=ev.batch_size,
                           seed=cfg.seed if images.seed is None else images.seed, device=device)


def evaluate_sets(cfg: RunConfig, ds: Dataset, sets: dict, *,
                  reference: Reference | None = None, workers: int | None = None,
                  ray_address: str | None = None, progress: bool = True) -> dict[str, EvalResult]:
    """``eval.runs`` runs of every set; ``workers=0`` in-process, else Ray tasks (at most
    ``workers`` at once; None: as many as Ray schedules)."""
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    epochs = {m: config_epochs(cfg.eval, len(s.images), len(ds.y_train)) for m, s in sets.items()}
    jobs = [(m, k) for m in sets for k in range(cfg.eval.runs)]
    gpus = num_gpus(cfg)
    bar = tqdm(total=len(jobs), desc="eval runs", disable=not progress)
    done: dict[tuple[str, int], torch.Tensor] = {}
    if workers == 0 or not jobs:
        for m, k in jobs:
            done[m, k] = run_task(cfg, ds, sets[m], k, epochs[m], gpus)
            bar.update(1)
    else:
        _on_ray(cfg, ds, sets, jobs, epochs, gpus, done, bar, workers=workers, address=ray_address)
    bar.close()
    out = {}
    for m, s in sets.items():
        cover = None if reference is None else coverage_of(s.images, reference)
        out[m] = summarize([done[m, k] for k in range(cfg.eval.runs)], reference=reference,
                           coverage=cover, epochs=epochs[m], model=cfg.eval.model,
                           augment=s.augment_in(cfg), n_images=len(s.images))
    return out


def _on_ray(cfg: RunConfig, ds: Dataset, sets: dict[str, ImageSet], jobs: list, epochs: dict,
            gpus: float, done: dict, bar: tqdm, *, workers: int | None,
            address: str | None) -> None:
    import ray

    from launch.ray_utils import init_ray

    started = init_ray(address)
    try:
        task = ray.remote(num_cpus=cfg.eval.num_cpus, num_gpus=gpus, max_retries=1)(run_task)
        ds_ref = ray.put(ds)
        refs = {m: ray.put(s) for m, s in sets.items()}
        queue, running = list(jobs), {}
        limit = workers or len(jobs)
        while queue or running:
            while queue and len(running) < limit:
                m, k = queue.pop(0)
                running[task.remote(cfg, ds_ref, refs[m], k, epochs[m], gpus)] = (m, k)
            finished, _ = ray.wait(list(running), num_returns=1)
            key = running.pop(finished[0])
            done[key] = ray.get(finished[0])
            bar.update(1)
    finally:
        if started:
            ray.shutdown()
