"""Evaluation runs as Ray tasks give the same numbers as in-process runs (launch/evaluate.py)."""

from __future__ import annotations

import pytest
import torch

from distill.baselines import baseline_set
from distill.data import load_configured
from distill.evaluate import Protocol, Reference, train_network
from distill.freshness import Freshness
from distill.rng import EVAL_RUN, derived_seed
from distill.runtime import cpu_threads
from distill.scores import load_scores
from distill.selection import Start
from launch.evaluate import ImageSet, evaluate_sets, num_gpus
from launch.stages import ReferenceCache


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from tiny import prepare, tiny_config

    run_dir = tmp_path_factory.mktemp("evalpar")
    cfg = prepare(tiny_config(run_dir, eval={"model": "convnet", "runs": 3, "epochs": 3,
                                             "batch_size": 16, "num_cpus": 1}))
    ds = load_configured(cfg.data)
    scores = load_scores(cfg.run_dir, "forgetting")
    sets = {}
    for method, start in (("random", Start("random")), ("window", Start("window", 0.2))):
        s = baseline_set(cfg, ds, start, scores)
        sets[method] = ImageSet(s.images().detach(), s.labels, s.is_distilled, augment="combined")
    return cfg, ds, sets


def test_ray_and_in_process_runs_are_identical(prepared, ray_local):
    cfg, ds, sets = prepared
    local = evaluate_sets(cfg, ds, sets, workers=0, progress=False)
    on_ray = evaluate_sets(cfg, ds, sets, workers=None, progress=False)  # the fixture's Ray
    assert set(local) == set(on_ray) == {"random", "window"}
    for method in sets:
        assert local[method].runs == 3 and len(local[method].accuracies) == 3
        assert local[method].accuracies == on_ray[method].accuracies  # bitwise, run by run
        assert local[method].to_dict() == on_ray[method].to_dict()
    # the runs are independent trainings (seeded from (seed, run)), not copies of one
    assert len(set(local["random"].accuracies)) > 1 or len(set(local["window"].accuracies)) > 1


def test_in_process_matches_runs_written_out_by_hand(prepared):
    """evaluate_sets in-process equals training each run by hand: run k seeded from (seed, k),
    the config's protocol, predictions counted on the test split."""
    cfg, ds, sets = prepared
    got = evaluate_sets(cfg, ds, {"window": sets["window"]}, workers=0, progress=False)["window"]
    s = sets["window"]
    protocol = Protocol.of(cfg, ds.info, epochs=cfg.eval.epochs, augment=s.augment)
    want = []
    with cpu_threads(cfg.eval.num_cpus):
        for run in range(cfg.eval.runs):
            seed = derived_seed(EVAL_RUN.generator(cfg.seed, run))
            net = train_network(s.images, s.labels, num_classes=ds.num_classes, seed=seed,
                                protocol=protocol, is_distilled=s.is_distilled)
            with torch.no_grad():
                want.append(float((net(ds.x_test).argmax(1) == ds.y_test).float().mean()))
    assert got.accuracies == want


def test_reference_metrics_computed_in_the_driver(prepared):
    cfg, ds, sets = prepared
    ref: Reference = ReferenceCache(Freshness(cfg), ds).get()
    res = evaluate_sets(cfg, ds, {"random": sets["random"]}, reference=ref, workers=0,
                        progress=False)["random"]
    assert res.coverage is not None and 0 <= res.coverage <= 1
    assert res.easy_acc is not None and res.hard_acc is not None


def test_bad_workers_and_gpu_default(prepared, monkeypatch):
    cfg, ds, sets = prepared
    with pytest.raises(ValueError, match="--workers must be >= 0, got -1"):
        evaluate_sets(cfg, ds, sets, workers=-1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert num_gpus(cfg) == 1.0  # eval.num_gpus None: one GPU per run where there is CUDA


def test_one_rule_for_where_a_job_runs(monkeypatch):
    """distill.runtime.device_for replaced the device helpers of launch/stages.py,
    launch/experts.py, launch/evaluate.py and tune/trials.py."""
    from distill.runtime import device_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [device_for(), device_for(0), device_for(1)] == ["cpu", "cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [device_for(), device_for(0), device_for(0.5)] == ["cuda", "cpu", "cuda"]
