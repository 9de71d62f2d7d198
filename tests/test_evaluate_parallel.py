"""Evaluation runs as Ray tasks give the same numbers as in-process runs (launch/evaluate.py)."""

from __future__ import annotations

import pytest
import torch

from distill.data import load_configured
from distill.evaluate import Reference, evaluate_images
from distill.methods import eval_network, real_augment
from distill.runtime import cpu_threads
from distill.synset import load_synset
from launch.evaluate import ImageSet, evaluate_sets, num_gpus
from launch.stages import ReferenceCache, stage_selection


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from tiny import prepare, tiny_config

    run_dir = tmp_path_factory.mktemp("evalpar")
    cfg = prepare(tiny_config(run_dir, eval={"model": "convnet", "runs": 3, "epochs": 3,
                                             "batch_size": 16, "num_cpus": 1}))
    ds = load_configured(cfg.data)
    for name in ("random", "window"):
        stage_selection(cfg, cfg, name, ds, best_beta=0.2)
    sets = {}
    for method in ("random", "window"):
        s, _ = load_synset(cfg.run_dir, method)
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


def test_in_process_matches_the_sequential_library_function(prepared):
    cfg, ds, sets = prepared
    reference = None
    got = evaluate_sets(cfg, ds, {"window": sets["window"]}, workers=0, progress=False)["window"]
    ev = cfg.eval
    with cpu_threads(ev.num_cpus):
        want = evaluate_images(sets["window"].images, sets["window"].labels, ds, model=ev.model,
                               epochs=ev.epochs, runs=ev.runs, augment="combined",
                               is_distilled=sets["window"].is_distilled, lr=ev.lr,
                               momentum=ev.momentum, weight_decay=ev.weight_decay,
                               batch_size=ev.batch_size, seed=cfg.seed, reference=reference,
                               progress=False, real=real_augment(cfg, ds.info),
                               **eval_network(cfg))
    want.crop_fill = "black"  # the library function takes the fill as a tensor, not its name
    assert got.to_dict() == want.to_dict()


def test_reference_metrics_computed_in_the_driver(prepared):
    cfg, ds, sets = prepared
    ref: Reference = ReferenceCache(cfg, ds).get()
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
