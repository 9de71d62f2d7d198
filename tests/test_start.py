"""The random subset is a candidate start (distill/search.py ``decide_start``): SelMatch starts
from a window only when it beats the random subset of the same pool on validation beyond the
noise; a config pins either start; the random start's partial update keeps its harder part
real; the report shows the update's gain on both starts."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from distill import search, storage
from distill.methods import with_fields
from distill.scores import load_scores
from distill.search import Point, decide_start
from distill.synset import load_synset
from launch.pipeline import run_pipeline
from tiny import prepare, tiny_config
from tune.main import run_tune

ROWS = ["random", "window", "init", "selmatch", "selmatch_dsa", "random_partial",
        "random_partial_dsa", "mtt"]


def point(correct: list[list[bool]]) -> Point:
    return Point(torch.tensor(correct))


def test_the_window_must_beat_the_random_subset_beyond_the_noise():
    n = 200
    good = [[True] * 180 + [False] * 20]
    weak = [[True] * 170 + [False] * 30]
    bad = [[True] * 100 + [False] * 100]
    assert decide_start(point(bad), point(good), 0.3)["init"] == "random"  # loses
    assert decide_start(point(weak), point(good), 0.3)["init"] == "random"  # within noise
    won = decide_start(point(good), point(bad), 0.3)
    assert won["init"] == "window" and won["beta"] == 0.3 and "beats" in won["why"]
    tie = decide_start(point(good), point(good), 0.3)
    assert tie["init"] == "random" and "does not beat" in tie["why"] and len(good[0]) == n


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    return prepare(tiny_config(root, select={"beta": None, "init": "auto"},
                               eval={"model": "convnet", "runs": 1, "epochs": 2,
                                     "batch_size": 32, "methods": ROWS},
                               tune={"beta_step": 0.25, "beta_epoch_fraction": 0.5,
                                     "alpha_iterations": 1, "alpha_step": 0.5,
                                     "max_concurrent": 1},
                               distill={"iterations": 2}))


def fresh(prepared, tmp_path, **fields):
    import shutil

    for part in ("experts", "scores"):
        shutil.copytree(f"{prepared.run_dir}/{part}", tmp_path / part)
    return with_fields(dataclasses.replace(prepared, run_dir=str(tmp_path)), fields)


@pytest.fixture
def windows_lose(monkeypatch):
    """Every window scores nothing right on validation: each loses to the random subset."""
    real = search.SearchContext.beta_point

    def beta_point(self, beta):
        rec = real(self, beta)
        return {**rec, **Point(torch.zeros(self.cfg.tune.eval_runs, rec["n_val"],
                                           dtype=torch.bool)).record()}

    monkeypatch.setattr(search.SearchContext, "beta_point", beta_point)


def test_windows_that_lose_make_selmatch_start_from_the_random_subset(prepared, tmp_path,
                                                                      windows_lose, caplog):
    cfg = fresh(prepared, tmp_path)
    caplog.set_level(logging.INFO)
    run_pipeline(cfg, workers=0)
    window = json.loads(storage.read_text(f"{cfg.run_dir}/window/results.json"))
    assert window["start"]["init"] == "random" and "does not beat" in window["start"]["why"]
    assert "does not beat the random subset" in caplog.text
    meta = load_synset(cfg.run_dir, "selmatch")[1]["meta"]
    assert meta["start"] == {"init": "random", "beta": None, "source": "window search"}
    # the same images as the random row, and as the random start + partial update
    selmatch, _ = load_synset(cfg.run_dir, "selmatch_init")
    random, _ = load_synset(cfg.run_dir, "random")
    assert sorted(selmatch.source_index.tolist()) == sorted(random.source_index.tolist())
    # the harder part stays real, the easier part is distilled (by the difficulty scores)
    hard = load_scores(cfg.run_dir, cfg.scores.kind).hardness()
    for c in range(10):
        rows = selmatch.labels == c
        real = hard[selmatch.source_index[rows & ~selmatch.is_distilled].numpy()]
        learnt = hard[selmatch.source_index[rows & selmatch.is_distilled].numpy()]
        assert real.min() >= learnt.max()
    report = storage.read_text(f"{cfg.run_dir}/report.md")
    assert "random (window search)" in report and "does not beat the random subset" in report


def test_tune_decides_the_start_the_same_way(prepared, tmp_path, windows_lose):
    import yaml

    cfg = fresh(prepared, tmp_path)
    summary = run_tune(cfg, use_ray=False)
    assert summary["start"]["init"] == "random"
    text = storage.read_text(f"{cfg.run_dir}/tune/selected.yaml")
    assert yaml.safe_load(text)["select"] == {"init": "random", "beta": None}
    assert "# start: the window at" in text and "does not beat the random subset" in text


def test_a_pinned_start_is_respected(prepared, tmp_path, windows_lose):
    window = fresh(prepared, tmp_path / "w", **{"select.init": "window",
                                                "eval.methods": ["selmatch"]})
    run_pipeline(window, workers=0)  # the searched β, although the random subset won
    meta = load_synset(window.run_dir, "selmatch")[1]["meta"]
    best = json.loads(storage.read_text(f"{window.run_dir}/window/results.json"))["best_beta"]
    assert meta["start"] == {"init": "window", "beta": best, "source": "window search"}
    pinned = fresh(prepared, tmp_path / "p", **{"select.beta": 0.25, "eval.methods":
                                                ["selmatch"]})
    run_pipeline(pinned, workers=0)
    assert load_synset(pinned.run_dir, "selmatch")[1]["meta"]["start"] == \
        {"init": "window", "beta": 0.25, "source": "config"}
    assert not storage.exists(f"{pinned.run_dir}/window/results.json")  # nothing to decide
    random = fresh(prepared, tmp_path / "r", **{"select.init": "random", "eval.methods":
                                                ["selmatch"]})
    run_pipeline(random, workers=0)
    assert load_synset(random.run_dir, "selmatch")[1]["meta"]["start"] == \
        {"init": "random", "beta": None, "source": "config"}


def test_the_update_is_measured_on_both_starts(prepared, tmp_path):
    cfg = fresh(prepared, tmp_path)
    run_pipeline(cfg, workers=0)
    results = json.loads(storage.read_text(f"{cfg.run_dir}/results.json"))
    assert set(results["methods"]) == set(ROWS)
    labels = {n: r["label"] for n, r in results["methods"].items()}
    assert labels["random_partial"] == "Random start + partial update (combined augmentation)"
    assert labels["random_partial_dsa"] == "Random start + partial update (DSA eval)"
    report = storage.read_text(f"{cfg.run_dir}/report.md")
    for label in labels.values():
        assert label in report
    partial, _ = load_synset(cfg.run_dir, "random_partial")
    random, _ = load_synset(cfg.run_dir, "random")
    assert sorted(partial.source_index.tolist()) == sorted(random.source_index.tolist())
    assert int(partial.is_distilled.sum()) == 20  # floor(0.5 * 4) per class
    assert results["methods"]["random_partial"]["start"] == \
        {"init": "random", "beta": None, "source": "the row"}
    assert np.isfinite(results["methods"]["random_partial"]["mean"])
