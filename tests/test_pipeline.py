"""`selmatch run`: every row of the paper's comparison on a tiny digits problem, two repetition
seeds, the report, and freshness on re-run (one rule for every stage)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from distill import storage
from distill.methods import PAPER_METHODS
from distill.scores import load_scores
from distill.selection import select_topk
from distill.synset import load_synset
from launch import stages
from launch.pipeline import run_pipeline
from tiny import tiny_config


def tiny(run_dir, **sections):
    base = dict(seed=2, distill={"iterations": 2, "syn_steps": 2},
                scores={"kind": "el2n"},  # so that the top-k row's forgetting must be computed
                eval={"model": "convnet", "runs": 2, "epochs": 3, "batch_size": 32},
                tune={"beta_step": 0.25, "beta_epoch_fraction": 0.5})
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    seed = base.pop("seed")
    cfg = tiny_config(run_dir, seed=seed, **base)
    return dataclasses.replace(cfg, seeds=[2, 3])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cfg = tiny(root)
    url = run_pipeline(cfg, workers=0)
    return cfg, storage.read_text(url), json.loads(storage.read_text(f"{root}/results.json"))


def test_report_has_every_paper_row(run):
    cfg, report, results = run
    assert set(results["methods"]) == set(PAPER_METHODS)
    for label in ("Random selection", "Top-k hardest (forgetting)", "Best window (validation β)",
                  "SelMatch's start alone", "MTT (random init, full update)",
                  "SelMatch's start + full update", "SelMatch's start + partial update (DSA eval)",
                  "SelMatch (combined augmentation)", "Random start + partial update",
                  "Ablation (the paper's Table 3)"):
        assert label in report
    assert "report_beta.png" in report and storage.exists(f"{cfg.run_dir}/report_beta.png")
    window = results["window"]
    assert window["betas"] == [0.0, 0.25, 0.5, 0.75] and window["best_beta"] in window["betas"]


def test_each_row_is_evaluated_with_the_papers_augmentation(run):
    """DSA for every selection and distillation baseline, combined only for SelMatch; a baseline
    trained with crop + flip (or combined with no distilled rows) fails here."""
    _, report, results = run
    got = {name: r["augment"] for name, r in results["methods"].items()}
    assert got == {"random": "dsa", "topk": "dsa", "window": "dsa", "init": "dsa", "mtt": "dsa",
                   "init_full": "dsa", "selmatch_dsa": "dsa", "selmatch": "combined",
                   "random_partial": "combined"}
    for r in results["methods"].values():  # every seed's record, not only the pooled row
        assert {rec["augment"] for rec in r["per_seed"]} == {r["augment"]}
    assert results["window"]["augment"] == "dsa"  # β trials: the rule of the window they score
    assert "| dsa |" in report  # digits are not flip-invariant: SelMatch's real rows never flip
    assert "| combined (real rows: crop, no flip, black fill) |" in report
    assert {r["flip"] for r in results["methods"].values()} == {None, False}


def test_accuracies_count_test_samples_and_beat_chance(run):
    """Every run's accuracy is a count of the 359 digits test samples it gets right, and every
    row beats always guessing the largest class by a margin (an evaluation on the wrong labels,
    split or mode lands at chance; "0 <= mean <= 1" could not tell)."""
    from distill.data import load_configured

    cfg, _, results = run
    y = load_configured(cfg.data).y_test
    n, chance = len(y), float(torch.bincount(y).max()) / len(y)
    for name, r in results["methods"].items():
        for acc in (a for rec in r["per_seed"] for a in rec["accuracies"]):
            assert abs(acc * n - round(acc * n)) < 1e-3, (name, acc)
        assert r["mean"] > chance + 0.05, (name, r["mean"], chance)


def test_topk_row_uses_forgetting_and_is_labelled_with_it(run):
    cfg, _, results = run
    topk = results["methods"]["topk"]
    assert topk["score"] == "forgetting" and topk["label"] == "Top-k hardest (forgetting)"
    forgetting = load_scores(cfg.run_dir, "forgetting")  # computed from the experts for the row
    ds_labels = torch.load(f"{cfg.run_dir}/synset/topk.pt", weights_only=False)
    want = select_topk(forgetting, _labels(cfg), 10, cfg.select.ipc, 0.0)
    assert torch.equal(ds_labels["source_index"], want.source_index)
    el2n = select_topk(load_scores(cfg.run_dir, "el2n"), _labels(cfg), 10, cfg.select.ipc, 0.0)
    assert not torch.equal(want.source_index, el2n.source_index)  # the choice of score matters


def _labels(cfg) -> np.ndarray:
    from distill.data import load_configured

    return load_configured(cfg.data).y_train.numpy()


def test_ablation_rows_come_from_the_same_experts_and_budget(run):
    cfg, _, results = run
    sets = {name: load_synset(cfg.run_dir, name)[1] for name in ("mtt", "init_full", "selmatch")}
    assert {s["meta"]["iterations"] for s in sets.values()} == {cfg.distill.iterations}
    assert sets["init_full"]["is_distilled"].all() and sets["mtt"]["is_distilled"].all()
    assert int(sets["selmatch"]["is_distilled"].sum()) == 20  # floor(0.5 * 4) per class
    init, _ = load_synset(cfg.run_dir, "selmatch_init")
    assert torch.equal(sets["init_full"]["source_index"], init.source_index)  # window at β
    alone, _ = load_synset(cfg.run_dir, "init")  # the init row: SelMatch's start, nothing distilled
    assert torch.equal(alone.images(), init.images()) and not alone.is_distilled.any()
    experts = set(range(cfg.experts.num_experts))
    for rep in (cfg.run_dir, f"{cfg.run_dir}/seeds/3"):
        for name in ("mtt", "init_full", "selmatch"):
            used = {r["expert"] for r in map(json.loads, storage.read_text(
                f"{rep}/logs/distill_{name}.jsonl").splitlines())}
            assert used <= experts
    assert not storage.exists(f"{cfg.run_dir}/seeds/3/experts")
    # selmatch_dsa evaluates the SelMatch set itself, with DSA instead of combined
    assert results["methods"]["selmatch_dsa"]["synset"] == "selmatch"


def test_seeds_give_different_sets_and_the_report_counts_them(run):
    cfg, report, results = run
    a, _ = load_synset(cfg.run_dir, "selmatch")
    b, _ = load_synset(f"{cfg.run_dir}/seeds/3", "selmatch")
    assert not torch.equal(a.images(), b.images())
    for name, r in results["methods"].items():
        assert r["seeds"] == [2, 3] and r["runs_per_seed"] == 2
        assert r["n"] == 4 and len(r["per_seed"]) == 2
        pooled = [acc for rec in r["per_seed"] for acc in rec["accuracies"]]
        assert r["mean"] == pytest.approx(float(np.mean(pooled)))
        assert r["std"] == pytest.approx(float(np.std(pooled)))
    assert report.count("| 2 × 2 |") == len(PAPER_METHODS)


def test_second_run_redoes_nothing_and_changes_redo_exactly_what_is_stale(run, monkeypatch):
    cfg, _, _ = run
    calls = []
    for module, name in ((stages, "window_search"), (stages, "distill_set")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _n=name, **k:
                            (calls.append(_n), _real(*a, **k))[1])
    evaluated = []
    real_sets = stages.evaluate_sets
    monkeypatch.setattr(stages, "evaluate_sets", lambda cfg, ds, sets, **k: (
        calls.append("evaluate_sets"), evaluated.extend(sets), real_sets(cfg, ds, sets, **k))[2])
    run_pipeline(cfg, workers=0)
    assert calls == []
    # fewer evaluation runs: the evaluations are redone; the window search (1 run per β) and the
    # distillations are not
    run_pipeline(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, runs=1)), workers=0)
    assert calls == ["evaluate_sets"]  # every stale row of every seed in one batch of runs
    assert len(evaluated) == 2 * len(PAPER_METHODS)


def test_rows_not_asked_for_are_not_computed(tmp_path):
    cfg = tiny(tmp_path, eval={"methods": ["random", "selmatch"]})
    cfg = dataclasses.replace(cfg, seeds=None)
    run_pipeline(cfg, workers=0)
    results = json.loads(storage.read_text(f"{tmp_path}/results.json"))
    assert set(results["methods"]) == {"random", "selmatch"}
    assert not storage.exists(f"{tmp_path}/synset/mtt.pt")
    assert not storage.exists(f"{tmp_path}/synset/init_full.pt")
    assert not storage.exists(f"{tmp_path}/window/results.json")
    assert not storage.exists(f"{tmp_path}/scores/forgetting.npy")
    assert results["methods"]["selmatch"]["seeds"] == [2]
