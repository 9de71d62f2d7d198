"""Trial functions of the α/β search (paper App. E), scored on a validation split. No Ray here.

    ctx = TrialContext(cfg, ds, scores)            # once per process: split, validation set
    beta_trial(ctx, 0.3)                            # {"val_acc": ..., "epochs": ..., ...}
    alpha_trial(ctx, 0.5, beta=0.3, trial_dir=...)  # shortened distillation, then the same score

Decisions:

* **Validation, never test.** DESIGN.md §2 forbids choosing by test accuracy, and α and β are
  choices. Each class's training samples are split once, at random from (run seed, class), into a
  validation part (``tune.val_fraction``, at least one sample) and a pool. Trials select windows
  from the pool only and score the trained network on the validation part, so no trial ever trains
  on an image it is scored on, and every trial is scored on the same images. A random split (not
  "the last 10% in dataset order") because dataset order may carry structure (the synthetic
  dataset's noise grows with the rank in its class). The split, the β grid and the epoch rule
  are those of ``selmatch window`` (distill/baselines.py); that search keeps the validation rows
  in its pools and drops each candidate's own images from its score instead.
* **β keeps its meaning.** The window is taken in the pool's own difficulty order (the full order
  thinned by a random 10%), so β is the same difficulty quantile as in the final run on the full
  pool; windows cover IPC / (0.9 n_c) instead of IPC / n_c of the class, a small difference.
* **What is not held out.** The experts, and so the difficulty scores and the trajectories that α
  trials match, were trained on all training samples, validation part included. Retraining experts
  per split would cost more than the whole search; the leak is indirect (no validation image is a
  training image of the scored network) and is the same for every trial.
* **Short training.** β trials train for ``tune.beta_epoch_fraction`` of the evaluation epochs
  (the paper's 20% for CIFAR-10, 10% otherwise); the epochs are those the final evaluation would
  use for this many images (``eval.epochs`` or the ratio rule on the full training set). Every
  trial trains with the run seed, so trials differ only in their images (common random numbers).
* **α trials** run :func:`alpha_trial_iterations` distillation iterations (``tune.alpha_fraction``
  of ``distill.iterations`` unless ``tune.alpha_iterations`` is set) in their own directory, with
  the main run's experts read in place (nothing is copied), and resume from their checkpoint when a
  killed trial is run again with the same settings. App. E gives no shortened budget for α; the
  default fraction is measured in bench/results/alpha_budget.md.
* **Augmentation by the row a trial stands for** (distill/methods.py): a β trial scores a window
  (a selection row: DSA), an α trial a SelMatch set (combined), unless ``eval.augment`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import torch

from distill import storage
from distill.baselines import (
    beta_grid,
    search_epochs,
    validation_dataset,
    validation_split,
)
from distill.config import RunConfig, syn_lr_init
from distill.data import Dataset
from distill.distiller import Distiller
from distill.evaluate import evaluate_config
from distill.methods import augment_for
from distill.metrics import JsonlSink, Metrics
from distill.runtime import device_for
from distill.scores import Scores
from distill.selection import Selection, select_window, window_fits, window_start
from distill.synset import SyntheticSet
from distill.trajectories import ExpertStore

log = logging.getLogger(__name__)

METRIC = "val_acc"


def pool_window(scores: Scores, labels: np.ndarray, pool: np.ndarray, num_classes: int, ipc: int,
                beta: float, alpha: float) -> Selection:
    """The SelMatch window at β taken inside ``pool``; indices refer to the full training set."""
    labels = np.asarray(labels)
    sub = Scores(scores.kind, np.asarray(scores.values)[pool], scores.hard_end, scores.source)
    sel = select_window(sub, labels[pool], num_classes, ipc, beta, alpha)
    return dataclasses.replace(sel, source_index=torch.from_numpy(pool)[sel.source_index])


def feasible_beta(beta: float, *, ipc: int, pool_sizes: list[int], min_class_size: int) -> bool:
    """The window fits in every class's pool, and the value is valid for the final config
    (``select.beta + select.ipc / smallest class <= 1``, as distill.validation checks)."""
    if not 0 <= beta < 1 or not window_fits(beta, ipc, min_class_size):
        return False
    return all(window_start(n, beta) + ipc <= n for n in pool_sizes)


class TrialContext:
    """What every trial of one run shares: config, data, scores, the split, the validation set."""

    def __init__(self, cfg: RunConfig, ds: Dataset, scores: Scores, *, device: str | None = None):
        self.cfg, self.ds, self.scores = cfg, ds, scores
        self._device = device
        labels = ds.y_train.numpy()
        self.labels = labels
        self.pool, self.val = validation_split(ds, cfg.tune.val_fraction, cfg.seed)
        self.val_ds = validation_dataset(ds, self.val)
        self.pool_sizes = [int((labels[self.pool] == c).sum()) for c in range(ds.num_classes)]

    @property
    def device(self) -> str:
        """Decided where the trial runs (a Ray worker may have a GPU that the driver lacks)."""
        return self._device or device_for(self.cfg.tune.num_gpus)

    def beta_values(self) -> list[float]:
        """Grid values of β from 0 in steps of tune.beta_step that fit (before any bound)."""
        smallest = int(np.bincount(self.labels, minlength=self.ds.num_classes).min())
        return [b for b in beta_grid(self.cfg.tune.beta_step, self.cfg.select.ipc, smallest)
                if feasible_beta(b, ipc=self.cfg.select.ipc, pool_sizes=self.pool_sizes,
                                 min_class_size=smallest)]

    def selection(self, beta: float, alpha: float) -> Selection:
        return pool_window(self.scores, self.labels, self.pool, self.ds.num_classes,
                           self.cfg.select.ipc, beta, alpha)

    def score(self, images: torch.Tensor, labels: torch.Tensor, is_distilled: torch.Tensor,
              kind: str) -> dict:
        """Train the evaluation network on the images and test it on the validation set."""
        epochs = search_epochs(self.cfg, len(images), len(self.ds.y_train), kind)
        augment = augment_for("window" if kind == "beta" else "selmatch", self.cfg)
        res = evaluate_config(images, labels, self.val_ds, self.cfg.eval,
                              is_distilled=is_distilled, seed=self.cfg.seed, device=self.device,
                              runs=self.cfg.tune.eval_runs, epochs=epochs, augment=augment,
                              progress=False)
        return {METRIC: res.mean, "val_std": res.std, "epochs": epochs, "n_images": len(images),
                "n_val": len(self.val), "augment": augment}


def alpha_trial_iterations(cfg: RunConfig) -> int:
    """Distillation iterations of one α trial: ``tune.alpha_iterations`` if set, else
    round(``tune.alpha_fraction`` × ``distill.iterations``), at least 1."""
    if cfg.tune.alpha_iterations is not None:
        return cfg.tune.alpha_iterations
    return max(1, math.floor(cfg.tune.alpha_fraction * cfg.distill.iterations + 0.5))


def beta_trial(ctx: TrialContext, beta: float) -> dict:
    """Train on the real images of the window at β (α = 0) and score on validation."""
    t0 = time.perf_counter()
    sel = ctx.selection(beta, 0.0)
    out = ctx.score(ctx.ds.x_train[sel.source_index], sel.labels, sel.is_distilled, "beta")
    return {**out, "seconds": round(time.perf_counter() - t0, 2)}


def alpha_trial(ctx: TrialContext, alpha: float, *, beta: float, trial_dir: str,
                progress: bool = False) -> dict:
    """A shortened distillation at (β, α) in ``trial_dir``, then the β trial's score."""
    t0 = time.perf_counter()
    base = ctx.cfg
    iters = alpha_trial_iterations(base)
    cfg = dataclasses.replace(
        base, run_dir=trial_dir,
        select=dataclasses.replace(base.select, beta=beta, init="window"),
        distill=dataclasses.replace(base.distill, alpha=alpha, iterations=iters,
                                    checkpoint_every=min(base.distill.checkpoint_every, iters),
                                    log_every=min(base.distill.log_every, iters)))
    sel = ctx.selection(beta, alpha)
    synset = SyntheticSet.from_selection(sel, ctx.ds.x_train, syn_lr_init(cfg))
    loss = None
    if len(synset.distilled) and iters:
        synset = synset.to(ctx.device)
        sink = JsonlSink(storage.join(trial_dir, "logs", "distill.jsonl"))
        # the main run's experts, read where they are: a trial directory holds no copies
        distiller = Distiller(cfg, ctx.ds, synset, ExpertStore(base), device=ctx.device,
                              metrics=Metrics([sink]))
        ckpt = storage.join(trial_dir, "checkpoints", "selmatch.pt")
        if storage.exists(ckpt):
            try:
                distiller.load_checkpoint(ckpt)
            except ValueError as err:  # other settings: start over
                log.warning("ignoring %s (%s)", ckpt, err)
        distiller.run(checkpoint_url=ckpt, progress=progress)
        distiller.metrics.close()
        loss = distiller.history[-1]["loss"] if distiller.history else None
    images = synset.images().detach().cpu()
    out = ctx.score(images, synset.labels.cpu(), synset.is_distilled.cpu(), "alpha")
    return {**out, "final_loss": loss, "syn_lr": float(synset.syn_lr.detach()),
            "seconds": round(time.perf_counter() - t0, 2)}
