"""`selmatch run`: every stage on a tiny digits problem, the report, and skipping on re-run."""

from __future__ import annotations

import dataclasses
import json

from distill import storage
from launch import pipeline
from launch.pipeline import run_pipeline
from tiny import tiny_config


def tiny(run_dir):
    return tiny_config(run_dir, seed=2, distill={"iterations": 2, "syn_steps": 2},
                       eval={"model": "convnet", "runs": 2, "epochs": 3, "batch_size": 32},
                       tune={"beta_step": 0.25, "beta_epoch_fraction": 0.5})


def test_pipeline_end_to_end_and_resume(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    url = run_pipeline(cfg, workers=0)
    report = storage.read_text(url)
    for label in ("Random selection", "Top-k hardest", "Oracle window", "MTT", "SelMatch"):
        assert label in report
    assert "report_beta.png" in report and storage.exists(f"{tmp_path}/report_beta.png")
    results = json.loads(storage.read_text(f"{tmp_path}/results.json"))
    assert set(results["methods"]) == {"random", "topk", "window", "mtt", "selmatch"}
    for r in results["methods"].values():
        assert len(r["accuracies"]) == 2 and 0.0 <= r["mean"] <= 1.0
        assert r["coverage"] is not None and r["easy_acc"] is not None
    window = results["window"]
    assert window["betas"] == [0.0, 0.25, 0.5, 0.75] and window["best_beta"] in window["betas"]
    assert results["methods"]["selmatch"]["n_distilled"] == 20
    assert results["methods"]["mtt"]["n_distilled"] == 40
    assert results["methods"]["window"]["n_distilled"] == 0

    # a second run redoes nothing expensive
    calls = []
    for name in ("window_search", "run_distill"):
        real = getattr(pipeline, name)
        monkeypatch.setattr(pipeline, name,
                            lambda *a, _real=real, _n=name, **k: (calls.append(_n), _real(*a, **k))[1])
    evaluated = []
    real_sets = pipeline.evaluate_sets
    monkeypatch.setattr(pipeline, "evaluate_sets", lambda cfg, ds, sets, **k: (
        calls.append("evaluate_sets"), evaluated.extend(sets), real_sets(cfg, ds, sets, **k))[2])
    run_pipeline(cfg, workers=0)
    assert calls == []
    # changed evaluation settings redo the window search and the evaluations, not distillation
    run_pipeline(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, runs=1)), workers=0)
    assert sorted(set(calls)) == ["evaluate_sets", "window_search"]
    assert sorted(evaluated) == ["mtt", "random", "selmatch", "topk", "window"]
