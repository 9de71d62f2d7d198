"""Trial functions of the α/β search (paper App. E), scored on the run's validation split. No Ray.

    ctx = SearchContext(cfg, ds, scores)            # once per process: split, validation set
    beta_trial(ctx, 0.3)                            # {"val_acc": ..., "epochs": ..., ...}
    alpha_trial(ctx, 0.5, start=Start("window", 0.3), trial_dir=...)  # then the same score

What a trial selects from, what it is scored on, with which seeds and how ties are broken are
the decisions of distill/search.py, shared with the window search of ``selmatch run``: a β trial
is :meth:`~distill.search.SearchContext.beta_point`, so the same β gives the same number in both.

* **α trials** distil for :func:`alpha_trial_iterations` iterations (``tune.alpha_fraction`` of
  ``distill.iterations`` unless ``tune.alpha_iterations`` is set) through the one distillation
  path, :func:`distill.distiller.run_distill`, in their own run directory (the trial's window
  taken inside the pool, the main run's experts read in place): a killed trial resumes from its
  checkpoint when run again with the same settings, its JSONL and TensorBoard logs show each
  step once, and a checkpoint of other settings is ignored (the trial starts over). App. E gives
  no shortened budget for α; the default fraction is measured in bench/results/alpha_budget.md.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from distill import storage
from distill.config import RunConfig
from distill.selection import Start
from distill.metrics import read_jsonl
from distill.runtime import Runtime
from distill.search import METRIC, SearchContext
from launch.distillation import distill_trial

__all__ = ["METRIC", "SearchContext", "alpha_trial", "alpha_trial_config",
           "alpha_trial_iterations", "beta_trial"]


def alpha_trial_iterations(cfg: RunConfig) -> int:
    """Distillation iterations of one α trial: ``tune.alpha_iterations`` if set, else
    round(``tune.alpha_fraction`` × ``distill.iterations``), at least 1."""
    if cfg.tune.alpha_iterations is not None:
        return cfg.tune.alpha_iterations
    return max(1, math.floor(cfg.tune.alpha_fraction * cfg.distill.iterations + 0.5))


def beta_trial(ctx: SearchContext, beta: float) -> dict:
    """Train on the real images of the window at β (α = 0) and score on validation."""
    t0 = time.perf_counter()
    out = ctx.beta_point(beta)
    return {**out, "seconds": round(time.perf_counter() - t0, 2)}


def alpha_trial_config(base: RunConfig, alpha: float, *, start: Start,
                       trial_dir: str) -> RunConfig:
    """The config an α trial distils with: the run's, from ``start`` (a window at its β, or the
    random subset) at α, for the trial's iterations, in its own directory, one repetition."""
    iters = alpha_trial_iterations(base)
    return dataclasses.replace(
        base, run_dir=trial_dir, seeds=None, tuned=False,
        select=dataclasses.replace(base.select, beta=start.beta, init=start.init),
        distill=dataclasses.replace(base.distill, alpha=alpha, iterations=iters, mode="joint",
                                    checkpoint_every=min(base.distill.checkpoint_every, iters),
                                    log_every=min(base.distill.log_every, iters)))


def alpha_trial(ctx: SearchContext, alpha: float, *, start: Start, trial_dir: str,
                progress: bool = False) -> dict:
    """A shortened distillation at α from ``start`` in ``trial_dir``, then the β trial's score."""
    t0 = time.perf_counter()
    cfg = alpha_trial_config(ctx.cfg, alpha, start=start, trial_dir=trial_dir)
    synset = distill_trial(ctx.cfg, cfg, pool=ctx.pool, ds=ctx.ds,
                           runtime=Runtime(device=torch.device(ctx.device)), progress=progress)
    logged = read_jsonl(storage.join(trial_dir, "logs", "distill_selmatch.jsonl"))
    loss = logged[-1]["loss"] if logged else None
    images = synset.images().detach().cpu()
    out = ctx.score(images, synset.labels.cpu(), synset.is_distilled.cpu(), "alpha")
    return {**out, "final_loss": loss, "syn_lr": float(synset.syn_lr.detach()),
            "seconds": round(time.perf_counter() - t0, 2)}
