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

The rules App. E's searches share live here once, for this window search and for the α/β trials
of ``selmatch tune`` (tune/trials.py): the value grid, the β values whose window fits, the
fraction of the evaluation epochs a short training run gets, and the validation split.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.config import RunConfig
from distill.data import Dataset
from distill.evaluate import config_epochs, evaluate_config
from distill.methods import METHODS, augment_for
from distill.rng import VALIDATION_SPLIT
from distill.scores import Scores
from distill.selection import make_selection, select_window, window_fits
from distill.synset import SyntheticSet



# --------------------------------------------------------------------------------------------
# The rules of App. E's searches (this window search and tune/trials.py)
# --------------------------------------------------------------------------------------------

_DECIMALS = 10  # grid values are rounded so that 3 * 0.1 prints (and compares) as 0.3


def make_grid(lo: float, hi: float, step: float, *, bound: float | None = None) -> list[float]:
    """``lo, lo + step, ...`` up to ``hi`` (inclusive, within float tolerance), then only the
    values ``<= bound`` when a bound is given (the optimum of an earlier, smaller IPC)."""
    if not step > 0:
        raise ValueError(f"grid step must be > 0, got {step!r}")
    if hi < lo:
        raise ValueError(f"grid upper end {hi:g} is below its lower end {lo:g}")
    count = int(math.floor((hi - lo) / step + 1e-9)) + 1
    grid = [round(lo + k * step, _DECIMALS) for k in range(count)]
    if bound is not None:
        grid = [v for v in grid if v <= bound + 1e-9]
        if not grid:
            raise ValueError(f"no grid value from {lo:g} in steps of {step:g} is <= the bound "
                             f"{bound:g}")
    return grid


def beta_grid(step: float, ipc: int, min_class_size: int) -> list[float]:
    """β = 0, step, 2·step, … while the window still fits in the smallest class."""
    return [b for b in make_grid(0.0, 1.0, step) if b < 1 and window_fits(b, ipc, min_class_size)]


def epoch_fraction(cfg: RunConfig, kind: str = "beta") -> float:
    """Share of the evaluation epochs a search candidate trains for: ``tune.beta_epoch_fraction``,
    else App. E's 20% for CIFAR-10 and 10% otherwise; an α trial (``kind`` alpha) takes
    ``tune.alpha_epoch_fraction`` when set, else the same."""
    if kind == "alpha" and cfg.tune.alpha_epoch_fraction is not None:
        return cfg.tune.alpha_epoch_fraction
    if cfg.tune.beta_epoch_fraction is not None:
        return cfg.tune.beta_epoch_fraction
    return 0.2 if cfg.data.name == "cifar10" else 0.1


def search_epochs(cfg: RunConfig, n_images: int, n_train: int, kind: str = "beta") -> int:
    """Epochs of a search candidate: :func:`epoch_fraction` of what the final evaluation of
    ``n_images`` images would use (``eval.epochs`` or the ratio rule), rounded half up, >= 1."""
    full = config_epochs(cfg.eval, min(n_images, n_train), n_train)
    return max(1, math.floor(full * epoch_fraction(cfg, kind) + 0.5))


def validation_index(ds: Dataset, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """A fixed ``fraction`` of each class's training samples (sorted dataset indices)."""
    labels = ds.y_train.numpy()
    out = []
    for c in range(ds.info.num_classes):
        idx = np.flatnonzero(labels == c)
        perm = torch.randperm(len(idx), generator=VALIDATION_SPLIT.generator(seed, c)).numpy()
        out.append(idx[perm[:max(1, int(round(fraction * len(idx))))]])
    return np.sort(np.concatenate(out))


def validation_split(ds: Dataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, validation): sorted training indices; the validation rows are
    :func:`validation_index`'s (per class round(fraction * n_c), at least one, drawn from
    (seed, class)), the pool is the rest, and every class keeps at least one sample in it."""
    if not 0 < fraction < 1:
        raise ValueError(f"tune.val_fraction must be in (0, 1), got {fraction!r}")
    val = validation_index(ds, fraction=fraction, seed=seed)
    counts = np.bincount(ds.y_train.numpy(), minlength=ds.num_classes)
    left = counts - np.bincount(ds.y_train[val].numpy(), minlength=ds.num_classes)
    if (left < 1).any():
        raise ValueError(f"tune.val_fraction {fraction:g} leaves no training sample in class "
                         f"{int(np.argmin(left))} ({int(counts.min())} samples)")
    return np.setdiff1d(np.arange(len(ds.y_train)), val), val


def validation_dataset(ds: Dataset, val_index: np.ndarray,
                       exclude: np.ndarray | None = None) -> Dataset:
    """``ds`` whose test set is the validation rows (minus ``exclude``, a candidate's own
    images)."""
    keep = val_index if exclude is None else np.setdiff1d(val_index, exclude)
    return dataclasses.replace(ds, x_test=ds.x_train[keep], y_test=ds.y_train[keep])


# --------------------------------------------------------------------------------------------
# The window search and the selection rows
# --------------------------------------------------------------------------------------------


def window_search(cfg: RunConfig, ds: Dataset, scores: Scores, *, device="cpu",
                  progress: bool = True) -> dict:
    """Validation accuracy of each window β on the grid (one short training run each)."""
    c = ds.info.num_classes
    min_class = int(np.bincount(ds.y_train.numpy(), minlength=c).min())
    betas = beta_grid(cfg.tune.beta_step, cfg.select.ipc, min_class)
    n_images, n_train = cfg.select.ipc * c, len(ds.y_train)
    full = config_epochs(cfg.eval, n_images, n_train)
    epochs = search_epochs(cfg, n_images, n_train)
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
    inits = {m.name: m.init for m in METHODS.values() if m.made_by == "selection"}
    if method not in inits:
        raise ValueError(f"{method!r} is not a selection baseline; valid: {', '.join(inits)}")
    init = inits[method]
    sel = make_selection(init, scores=scores, labels=ds.y_train.numpy(),
                         num_classes=ds.info.num_classes, ipc=cfg.select.ipc,
                         beta=cfg.select.beta if beta is None else beta, alpha=0.0, seed=cfg.seed)
    return SyntheticSet.from_selection(sel, ds.x_train, cfg.experts.lr)
