"""Window selection and the α split, pinned to the paper's definition (β is a fraction of n_c)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.scores import Scores
from distill.selection import (
    class_order,
    make_selection,
    select_random,
    select_topk,
    select_window,
    split_counts,
    window,
)


def forgetting(values) -> Scores:
    return Scores("forgetting", np.asarray(values, dtype=float), "high", "test")


def test_class_order_hardest_first_ties_by_index():
    labels = np.array([0, 1, 0, 0, 1, 0, 1])
    s = forgetting([1, 5, 3, 1, 0, 7, 5])
    orders = class_order(s, labels, 2)
    assert orders[0].tolist() == [5, 2, 0, 3]  # 7, 3, then the tie 1/1 by index
    assert orders[1].tolist() == [1, 6, 4]     # tie 5/5 by index, then 0
    # C-score: low = hard, so the order flips
    c = Scores("cscore", np.asarray([1, 5, 3, 1, 0, 7, 5], float), "low", "test")
    assert class_order(c, labels, 2)[0].tolist() == [0, 3, 2, 5]


@pytest.mark.parametrize("n_c,ipc,beta,start", [
    (100, 10, 0.0, 0), (100, 10, 0.5, 50), (100, 10, 0.9, 90), (500, 25, 0.8, 400),
    (500, 50, 0.7, 350),      # 0.7 * 500 is 349.99999999999994 in floating point
    (5000, 250, 0.5, 2500), (143, 10, 0.3, 42),
])
def test_window_boundaries(n_c, ipc, beta, start):
    order = np.arange(n_c) * 3  # arbitrary ids in difficulty order
    w = window(order, ipc, beta)
    assert w.tolist() == order[start:start + ipc].tolist()


def test_window_past_the_end_is_an_error():
    with pytest.raises(ValueError, match="does not fit in class 4.*select.beta <= 0.9"):
        window(np.arange(100), 10, 0.95, cls=4)
    window(np.arange(100), 10, 0.9)  # exactly fits


@pytest.mark.parametrize("ipc,alpha,expect", [
    (10, 0.5, (5, 5)), (10, 0.0, (10, 0)), (10, 1.0, (0, 10)), (25, 0.8, (5, 20)),
    (250, 0.6, (100, 150)), (7, 0.5, (4, 3)),
    (10, 0.29, (8, 2)), (10, 0.3, (7, 3)),  # 0.3 * 10 is 2.9999999999999996 in floating point
])
def test_split_counts(ipc, alpha, expect):
    assert split_counts(ipc, alpha) == expect


def make_problem(classes=3, per_class=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    rng.shuffle(labels)
    return labels, forgetting(rng.integers(0, 20, len(labels)))


def test_select_window_split_and_layout():
    labels, s = make_problem()
    sel = select_window(s, labels, 3, ipc=10, beta=0.25, alpha=0.3)
    orders = class_order(s, labels, 3)
    assert len(sel) == 30
    for c in range(3):
        rows = slice(10 * c, 10 * (c + 1))
        assert (sel.labels[rows] == c).all()
        # window starts at floor(0.25 * 40) = 10; the harder 7 frozen, the easier 3 learnable
        assert sel.source_index[rows].tolist() == orders[c][10:20].tolist()
        assert sel.is_distilled[rows].tolist() == [False] * 7 + [True] * 3
        assert (labels[sel.source_index[rows].numpy()] == c).all()


def test_topk_is_the_hardest_and_random_is_seeded():
    labels, s = make_problem()
    top = select_topk(s, labels, 3, ipc=5, alpha=0.0)
    orders = class_order(s, labels, 3)
    assert top.source_index[:5].tolist() == orders[0][:5].tolist() and top.method == "topk"
    r1 = select_random(labels, 3, 5, 1.0, seed=1)
    r2 = select_random(labels, 3, 5, 1.0, seed=1)
    r3 = select_random(labels, 3, 5, 1.0, seed=2)
    assert torch.equal(r1.source_index, r2.source_index)
    assert not torch.equal(r1.source_index, r3.source_index)
    assert r1.is_distilled.all() and len(set(r1.source_index.tolist())) == 15


def test_make_selection_dispatch_and_errors():
    labels, s = make_problem()
    with pytest.raises(ValueError, match="window, random, topk"):
        make_selection("best", scores=s, labels=labels, num_classes=3, ipc=5, beta=0, alpha=0,
                       seed=0)
    with pytest.raises(ValueError, match="selmatch scores"):
        make_selection("window", scores=None, labels=labels, num_classes=3, ipc=5, beta=0,
                       alpha=0, seed=0)
    sel = make_selection("window", scores=s, labels=labels, num_classes=3, ipc=5, beta=0.5,
                         alpha=0.4, seed=0)
    assert sel.method == "window" and int(sel.is_distilled.sum()) == 6


def test_the_row_table_is_the_one_list_of_rows_and_sets():
    """distill/methods.py names every row, every synthetic set and how each is made; synset.py,
    the pipeline and the selection baselines read it instead of keeping lists of their own."""
    from distill.config import RunConfig
    from distill.methods import DISTILLED, METHODS, SYNSETS, distill_config
    from distill.selection import INITS

    assert set(SYNSETS) == {m.synset for m in METHODS.values()}
    assert set(DISTILLED) == {m.synset for m in METHODS.values() if m.made_by == "distill"}
    assert all((m.init in (*INITS, "start")) == (m.made_by == "selection")
               for m in METHODS.values())
    cfg = RunConfig()  # select.init auto: SelMatch's rows take the config's start
    assert {s: (distill_config(cfg, s).select.init, distill_config(cfg, s).distill.mode)
            for s in DISTILLED} == {"selmatch": ("auto", "joint"), "mtt": ("random", "joint"),
                                    "init_full": ("auto", "joint"), "merge": ("auto", "merge"),
                                    "random_partial": ("random", "joint")}
