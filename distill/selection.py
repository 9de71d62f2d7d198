"""Selection-based initialisation: which real images start the synthetic set, and which stay real.

Semantics (docs/design.md §2, the paper's Sec. 4 / Alg. 1):

* **Difficulty order.** Per class, the class's training samples sorted hardest first by the score's
  own direction (C-score ascending, forgetting and EL2N descending); ties by dataset index.
* **Window.** For class c with n_c samples and window start β ∈ [0, 1): m_c = floor(β·n_c) and
  W_c = sorted_c[m_c : m_c + IPC]. β is a fraction of the class's pool, not of IPC (the released
  code's ``int(IPC·β)`` contradicts the paper; we follow the paper).
* **Partial update.** n_distill = floor(α·IPC), n_select = IPC − n_distill per class. D_select =
  the first n_select of W_c (the harder part, frozen); D_distill = the rest (easier, learnable).

A :class:`Selection` lists, class by class, the selected rows then the distilled rows, with each
image's source index in the training set, so every method is saved in one format.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from distill.rng import RANDOM_SELECTION
from distill.scores import Scores

_EPS = 1e-9  # floor(0.7 * 500) must be 350, not 349 (0.7 * 500 = 349.99999999999994)

INITS = ("auto", "window", "random", "topk")
"""``select.init``: auto and window are resolved to a :class:`Start` (:func:`resolve_start`)."""


def _floor(x: float) -> int:
    return int(math.floor(x + _EPS))


def split_counts(ipc: int, alpha: float) -> tuple[int, int]:
    """(n_select, n_distill) per class."""
    n_distill = _floor(alpha * ipc)
    return ipc - n_distill, n_distill


@dataclass(frozen=True)
class Selection:
    """Rows of the initial synthetic set: class-major, within a class D_select then D_distill."""

    source_index: torch.Tensor   # long [n]: index into the training set
    labels: torch.Tensor         # long [n]
    is_distilled: torch.Tensor   # bool [n]
    method: str                  # window, random or topk
    beta: float | None = None

    def __len__(self) -> int:
        return len(self.labels)


def class_order(scores: Scores, labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Per class, the dataset indices of that class sorted hardest first (ties: lower index first)."""
    labels = np.asarray(labels)
    if len(scores.values) != len(labels):
        raise ValueError(f"{len(scores.values)} scores for {len(labels)} training samples")
    hardness = scores.hardness()
    orders = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        # lexsort sorts by the last key first: hardness descending, then index ascending
        orders.append(idx[np.lexsort((idx, -hardness[idx]))])
    return orders


def window_start(n_c: int, beta: float) -> int:
    return _floor(beta * n_c)


def window_fits(beta: float, ipc: int, n_c: int) -> bool:
    """β + IPC/n_c ≤ 1 (within 1e-9): the rule a configured window start obeys (docs/design.md §2),
    checked by the config validation and by both β searches' grids."""
    return beta + ipc / n_c <= 1 + _EPS


def window(order_c: np.ndarray, ipc: int, beta: float, *, cls: int = 0) -> np.ndarray:
    """W_c = sorted_c[floor(β·n_c) : floor(β·n_c) + IPC]; a window past the end is an error."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"select.beta must be in [0, 1), got {beta:g}")
    n_c = len(order_c)
    m = window_start(n_c, beta)
    if m + ipc > n_c:
        raise ValueError(
            f"window does not fit in class {cls}: start floor({beta:g} x {n_c}) = {m} plus "
            f"select.ipc {ipc} exceeds its {n_c} samples; use select.beta <= {1 - ipc / n_c:.4g}")
    return order_c[m:m + ipc]


def _assemble(parts: list[np.ndarray], ipc: int, alpha: float, method: str,
              beta: float | None) -> Selection:
    n_select, n_distill = split_counts(ipc, alpha)
    index, labels, distilled = [], [], []
    for c, rows in enumerate(parts):
        index.append(rows)
        labels.append(np.full(ipc, c))
        distilled.append(np.r_[np.zeros(n_select, bool), np.ones(n_distill, bool)])
    return Selection(torch.from_numpy(np.concatenate(index)).long(),
                     torch.from_numpy(np.concatenate(labels)).long(),
                     torch.from_numpy(np.concatenate(distilled)), method, beta)


def select_window(scores: Scores, labels: np.ndarray, num_classes: int, ipc: int, beta: float,
                  alpha: float) -> Selection:
    """SelMatch initialisation: each class's window at β, harder part frozen, easier part learnable."""
    orders = class_order(scores, labels, num_classes)
    parts = [window(o, ipc, beta, cls=c) for c, o in enumerate(orders)]
    return _assemble(parts, ipc, alpha, "window", beta)


def select_topk(scores: Scores, labels: np.ndarray, num_classes: int, ipc: int,
                alpha: float) -> Selection:
    """The IPC hardest samples per class (the paper's "Forgetting"/top-k baseline): β = 0."""
    sel = select_window(scores, labels, num_classes, ipc, 0.0, alpha)
    return Selection(sel.source_index, sel.labels, sel.is_distilled, "topk", 0.0)


def select_random(labels: np.ndarray, num_classes: int, ipc: int, alpha: float,
                  seed: int, scores: Scores | None = None) -> Selection:
    """IPC samples per class uniformly at random (MTT's initialisation), from (seed, class).
    Which samples does not depend on ``scores``; their order within a class does: by dataset
    index without scores, hardest first with them, so that a partial update keeps the harder
    part real and distils the easier one, as for a window."""
    labels = np.asarray(labels)
    hardness = None if scores is None else scores.hardness()
    parts = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if ipc > len(idx):
            raise ValueError(f"select.ipc {ipc} exceeds the {len(idx)} samples of class {c}")
        perm = torch.randperm(len(idx), generator=RANDOM_SELECTION.generator(seed, c)).numpy()
        chosen = np.sort(idx[perm[:ipc]])
        if hardness is not None:
            chosen = chosen[np.lexsort((chosen, -hardness[chosen]))]
        parts.append(chosen)
    return _assemble(parts, ipc, alpha, "random", None)


MADE = ("window", "random", "topk")
"""What a selection can be made as."""


@dataclass(frozen=True)
class Start:
    """Where a synthetic set starts: ``init`` (window, random or topk), the window's ``beta``,
    and where each came from (``config``, ``tune`` or ``window search``), for logs and the
    report."""

    init: str
    beta: float | None = None
    source: str = "config"

    def describe(self) -> str:
        where = f"the window at β = {self.beta:g}" if self.init == "window" else \
            {"random": "the random subset", "topk": "the IPC hardest"}[self.init]
        return f"{where} ({self.source})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def needs_scores(init: str, alpha: float) -> bool:
    """Whether a selection of ``init`` at ``alpha`` reads difficulty scores: every window and
    top-k, and a random subset that a partial update splits into its harder and easier part."""
    return init != "random" or 0 < alpha < 1


def needs_search(init: str, beta: float | None) -> bool:
    """Whether a start of ``select.init`` / ``select.beta`` is decided by the window search."""
    return init in ("auto", "window") and beta is None


def resolve_start(init: str, beta: float | None, decision: dict | None, *,
                  source: str = "config") -> Start:
    """The start ``select.init`` / ``select.beta`` ask for; ``decision`` (the window search's
    ``start``: ``{"init": "window" | "random", "beta": ...}`` and its ``best_beta``) where
    :func:`needs_search`. ``source`` names where the config's own values came from."""
    if init in ("random", "topk"):
        return Start(init, None, source)
    if beta is not None:
        return Start("window", float(beta), source)
    if decision is None:
        raise ValueError("the window search has not run: select.beta is null, so the start is "
                         "the search's choice (run `selmatch window`, or set select.beta)")
    if init == "window":
        return Start("window", float(decision["best_beta"]), "window search")
    chosen = decision["start"]
    return Start(chosen["init"], chosen.get("beta"), "window search")


def make_selection(init: str, *, scores: Scores | None, labels: np.ndarray, num_classes: int,
                   ipc: int, beta: float | None, alpha: float, seed: int,
                   pool: np.ndarray | None = None) -> Selection:
    """Dispatch on ``select.init``. With ``pool`` (sorted training indices) the selection is
    made among those samples only, in their own difficulty order, and the indices it returns
    still refer to the whole training set (the searches select from the training set minus their
    validation split: distill/search.py)."""
    if init not in MADE:
        raise ValueError(f"a selection is one of {', '.join(MADE)}; got {init!r} (auto is "
                         f"resolved to one of them first: resolve_start)")
    if needs_scores(init, alpha) and scores is None:
        raise ValueError(f"select.init {init} needs difficulty scores; run `selmatch scores`")
    labels = np.asarray(labels)
    if pool is not None:
        pool = np.asarray(pool)
        sub = None if scores is None else Scores(scores.kind, np.asarray(scores.values)[pool],
                                                 scores.hard_end, scores.source)
        sel = make_selection(init, scores=sub, labels=labels[pool], num_classes=num_classes,
                             ipc=ipc, beta=beta, alpha=alpha, seed=seed)
        return dataclasses.replace(sel, source_index=torch.from_numpy(pool)[sel.source_index])
    if init == "random":  # the order inside a class matters only to a partial update's split
        return select_random(labels, num_classes, ipc, alpha, seed,
                             scores if 0 < alpha < 1 else None)
    if init == "topk":
        return select_topk(scores, labels, num_classes, ipc, alpha)
    if beta is None:
        raise ValueError("a window needs its start select.beta (null: resolve it with the "
                         "window search's choice first)")
    return select_window(scores, labels, num_classes, ipc, beta, alpha)
