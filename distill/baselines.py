"""The selection rows of the report, made without ever looking at the test set.

* ``random``: IPC random real images per class (seeded);
* ``topk``: the IPC hardest per class (the paper's "Forgetting" baseline, β = 0), by the scores
  of ``scores.topk`` (forgetting by default);
* ``window``: the best window: the window at the β chosen by the window search on the validation
  split (distill/search.py), taken from the whole training set;
* ``init``: SelMatch's starting set alone: the window at the configured ``select.beta``, nothing
  distilled (α = 0).
"""

from __future__ import annotations

from distill.config import RunConfig
from distill.data import Dataset
from distill.methods import METHODS
from distill.scores import Scores
from distill.selection import make_selection
from distill.synset import SyntheticSet


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
