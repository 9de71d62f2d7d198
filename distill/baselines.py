"""The selection rows of the report, made without ever looking at the test set.

* ``random``: IPC random real images per class (seeded);
* ``topk``: the IPC hardest per class (the paper's "Forgetting" baseline, β = 0), by the scores
  of ``scores.topk`` (forgetting by default);
* ``window``: the best window: the window at the β chosen by the window search on the validation
  split (distill/search.py), taken from the whole training set;
* ``init``: SelMatch's start alone (its β or the random subset, as distill/selection.py's
  ``resolve_start`` decides), nothing distilled (α = 0).
"""

from __future__ import annotations

from distill.config import RunConfig
from distill.data import Dataset
from distill.scores import Scores
from distill.selection import Start, make_selection
from distill.synset import SyntheticSet


def baseline_set(cfg: RunConfig, ds: Dataset, start: Start,
                 scores: Scores | None) -> SyntheticSet:
    """A pure selection (nothing distilled) from ``start`` at ``cfg``'s IPC and seed."""
    sel = make_selection(start.init, scores=scores, labels=ds.y_train.numpy(),
                         num_classes=ds.info.num_classes, ipc=cfg.select.ipc, beta=start.beta,
                         alpha=0.0, seed=cfg.seed)
    return SyntheticSet.from_selection(sel, ds.x_train, cfg.experts.lr)
