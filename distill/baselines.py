"""Selection baselines and the window search, evaluated without ever looking at the test set.

* ``random``: IPC random real images per class (seeded);
* ``topk``: the IPC hardest per class (the paper's "Forgetting" baseline, β = 0), by the scores
  of ``scores.topk`` (forgetting by default);
* ``window``: the oracle window: the best β of a grid search (App. E: each candidate trained for a
  fraction of the evaluation epochs);
* ``init``: SelMatch's starting set alone: the window at the configured ``select.beta``, nothing
  distilled (α = 0).

Candidates of the search are trained with the augmentation of the row they stand for (the window
row: DSA by the paper's rule, distill/methods.py), unless ``eval.augment`` overrides it.

The search scores a candidate on a **validation split carved from the training data** (a fixed,
seeded fraction of each class), never on the test set. A validation image that is also one of the
candidate's training images is left out of that candidate's score, so no candidate is rewarded for
memorising its own images.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.config import RunConfig
from distill.data import Dataset
from distill.evaluate import eval_epochs, evaluate_config
from distill.methods import augment_for
from distill.rng import VALIDATION_SPLIT
from distill.scores import Scores
from distill.selection import make_selection, select_window
from distill.synset import SyntheticSet

_INITS = {"random": "random", "topk": "topk", "window": "window", "init": "window"}


def validation_index(ds: Dataset, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """A fixed ``fraction`` of each class's training samples (sorted dataset indices)."""
    labels = ds.y_train.numpy()
    out = []
    for c in range(ds.info.num_classes):
        idx = np.flatnonzero(labels == c)
        perm = torch.randperm(len(idx), generator=VALIDATION_SPLIT.generator(seed, c)).numpy()
        out.append(idx[perm[:max(1, int(round(fraction * len(idx))))]])
    return np.sort(np.concatenate(out))


def validation_dataset(ds: Dataset, val_index: np.ndarray, exclude: np.ndarray) -> Dataset:
    """``ds`` whose test set is the validation rows minus ``exclude`` (a candidate's own images)."""
    keep = np.setdiff1d(val_index, exclude)
    return dataclasses.replace(ds, x_test=ds.x_train[keep], y_test=ds.y_train[keep])


def beta_grid(cfg: RunConfig, min_class_size: int) -> list[float]:
    """β = 0, step, 2·step, … while the window still fits in the smallest class."""
    step = cfg.tune.beta_step
    top = 1.0 - cfg.select.ipc / min_class_size
    return [round(i * step, 10) for i in range(int(math.floor(top / step + 1e-9)) + 1)]


def search_epoch_fraction(cfg: RunConfig) -> float:
    if cfg.tune.beta_epoch_fraction is not None:
        return cfg.tune.beta_epoch_fraction
    return 0.2 if cfg.data.name == "cifar10" else 0.1  # App. E


def window_search(cfg: RunConfig, ds: Dataset, scores: Scores, *, device="cpu",
                  progress: bool = True) -> dict:
    """Validation accuracy of each window β on the grid (one short training run each)."""
    c = ds.info.num_classes
    min_class = int(np.bincount(ds.y_train.numpy(), minlength=c).min())
    betas = beta_grid(cfg, min_class)
    ratio = cfg.select.ipc * c / len(ds.y_train)
    full = cfg.eval.epochs or eval_epochs(ratio)
    epochs = max(1, int(round(search_epoch_fraction(cfg) * full)))
    val = validation_index(ds, seed=cfg.seed)
    augment = augment_for("window", cfg)
    accs = []
    for beta in tqdm(betas, desc="window search", disable=not progress):
        sel = select_window(scores, ds.y_train.numpy(), c, cfg.select.ipc, beta, 0.0)
        idx = sel.source_index.numpy()
        res = evaluate_config(ds.x_train[idx], sel.labels, validation_dataset(ds, val, idx),
                              cfg.eval, seed=cfg.seed, device=device, runs=1, epochs=epochs,
                              augment=augment, progress=False)
        accs.append(res.mean)
    best = int(np.argmax(accs))
    return {"betas": betas, "val_accuracy": accs, "best_beta": betas[best], "epochs": epochs,
            "full_epochs": full, "validation_size": int(len(val)), "metric": "validation accuracy",
            "augment": augment}


def baseline_set(method: str, cfg: RunConfig, ds: Dataset, scores: Scores | None,
                 beta: float | None = None) -> SyntheticSet:
    """A pure selection (nothing distilled) for ``random``, ``topk``, ``window`` at ``beta``, or
    ``init`` (the window at ``select.beta``)."""
    if method not in _INITS:
        raise ValueError(f"{method!r} is not a selection baseline; valid: {', '.join(_INITS)}")
    init = _INITS[method]
    sel = make_selection(init, scores=scores, labels=ds.y_train.numpy(),
                         num_classes=ds.info.num_classes, ipc=cfg.select.ipc,
                         beta=cfg.select.beta if beta is None else beta, alpha=0.0, seed=cfg.seed)
    return SyntheticSet.from_selection(sel, ds.x_train, cfg.experts.lr)
