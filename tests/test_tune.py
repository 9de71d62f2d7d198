"""The App. E search: the hill-climb state machine, its Ray Tune Searcher, trials, end to end."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import yaml

from distill import storage
from distill.search import make_grid, validation_split
from distill.config import ConfigError
from distill.config_io import load_config
from distill.data import load_configured
from distill.metrics import read_jsonl
from distill.scores import load_scores
from tiny import prepare, tiny_config
from distill.config_io import tuned_overlay
from tune.main import TrialLog, _run_local, run_tune
from tune.search import HillClimb
from distill.search import SearchContext, feasible_beta

GRID = make_grid(0.0, 1.0, 0.1)  # 11 values, start 0.5


def concave(peak: float):
    return lambda x: 1.0 - (x - peak) ** 2


def drive(climb: HillClimb, f, *, shuffle: random.Random | None = None,
          pending: list[float] | None = None) -> list[float]:
    """Run the climb to the end; with ``shuffle``, pending trials finish in random order.
    ``pending``: values suggested before (not yet observed)."""
    tried, pending = [], list(pending or [])
    while not climb.finished:
        while (v := climb.suggest()) is not None:
            tried.append(v)
            pending.append(v)
        assert pending, "not finished, nothing to suggest and nothing pending: stuck"
        v = shuffle.choice(pending) if shuffle else pending[0]
        pending.remove(v)
        climb.observe(v, f(v))
    assert len(tried) == len(set(tried)), f"a grid point was tried twice: {tried}"
    return tried


# --------------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------------


def test_grid_and_bound():
    assert GRID == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert make_grid(0.0, 1.0, 0.1, bound=0.3) == [0.0, 0.1, 0.2, 0.3]  # bound inclusive
    assert make_grid(0.0, 0.85, 0.2) == [0.0, 0.2, 0.4, 0.6, 0.8]
    with pytest.raises(ValueError, match="bound"):
        make_grid(0.2, 1.0, 0.1, bound=0.1)


@pytest.mark.parametrize("peak_index", range(11))
@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_finds_the_maximum_of_a_concave_curve_with_fewer_trials(peak_index, in_flight):
    peak = GRID[peak_index]
    climb = HillClimb(GRID, max_in_flight=in_flight)
    tried = drive(climb, concave(peak), shuffle=random.Random(peak_index))
    assert climb.best() == (peak, 1.0)
    assert len(tried) < len(GRID)
    # the walk only goes towards the peak: at most the distance plus the probes around it
    assert len(tried) <= abs(peak_index - 5) + 3 + (in_flight - 1)


def test_paper_example_start_middle_probe_neighbours_walk_until_drop():
    climb = HillClimb(GRID, max_in_flight=2)
    assert [climb.suggest(), climb.suggest(), climb.suggest()] == [0.5, 0.4, None]  # 2 in flight
    f = concave(0.3)
    climb.observe(0.5, f(0.5))
    assert climb.suggest() == 0.6  # both neighbours of the incumbent are probed
    climb.observe(0.4, f(0.4))
    assert climb.suggest() == 0.3  # 0.4 is better: walk left
    climb.observe(0.6, f(0.6))
    climb.observe(0.3, f(0.3))
    assert climb.suggest() == 0.2
    climb.observe(0.2, f(0.2))  # dropped: stop
    assert climb.suggest() is None and climb.finished
    assert climb.best()[0] == 0.3 and len(climb.history) == 5


def test_bound_restricts_the_walk():
    grid = make_grid(0.0, 1.0, 0.1, bound=0.4)
    climb = HillClimb(grid)
    tried = drive(climb, concave(0.9))
    assert max(tried) <= 0.4 and climb.best()[0] == 0.4


def test_prior_start_is_snapped_to_the_grid():
    climb = HillClimb(GRID, start=0.72, max_in_flight=1)
    assert climb.suggest() == 0.7
    drive(climb, concave(0.8), pending=[0.7])
    assert climb.best()[0] == 0.8 and len(climb.history) == 4  # 0.7, 0.6, 0.8, 0.9


def test_plateau_terminates_at_the_start():
    climb = HillClimb(GRID, max_in_flight=3)
    tried = drive(climb, lambda x: 0.5)
    assert sorted(tried) == [0.4, 0.5, 0.6] and climb.best() == (0.5, 0.5)


def test_plateau_after_a_rise_stops_at_the_first_top():
    climb = HillClimb(GRID, max_in_flight=1)
    drive(climb, lambda x: min(x, 0.7))  # rises to 0.7, flat afterwards
    assert climb.best()[0] == 0.7 and len(climb.history) == 5  # 0.5 0.4 0.6 0.7 0.8


@pytest.mark.parametrize("seed", range(20))
def test_noisy_metric_terminates_without_revisits(seed):
    rng = random.Random(seed)
    climb = HillClimb(GRID, max_in_flight=rng.choice([1, 2, 3]))
    tried = drive(climb, lambda x: concave(0.3)(x) + rng.gauss(0, 0.05), shuffle=rng)
    assert len(tried) <= len(GRID)
    best_value, best_metric = climb.best()
    assert best_metric == max(o.metric for o in climb.history)
    assert {best_value - 0.1, best_value + 0.1} & set(GRID) <= set(tried)  # neighbours checked


def test_failed_trials_are_recorded_as_failed_never_best():
    climb = HillClimb(GRID, max_in_flight=1)
    f = concave(0.8)
    metrics = {0.6: None, 0.7: math.nan}  # the walk must pass them as failures

    tried = drive(climb, lambda x: metrics.get(x, f(x)))
    status = {o.value: o.status for o in climb.history}
    assert status[0.6] == "failed"
    assert {o.metric for o in climb.history if o.status == "failed"} == {None}
    assert 0.7 not in tried  # 0.6 failed (worse than 0.5): the climb stops on that side
    assert climb.best() == (0.5, f(0.5))

    # the start fails: both neighbours are probed (2 in flight) and the walk goes on from 0.6
    climb = HillClimb(GRID, max_in_flight=2)
    drive(climb, lambda x: math.nan if x == 0.5 else f(x))
    assert climb.history[0].status == "failed" and climb.best()[0] == 0.8


def test_all_failed_stops_with_no_best():
    climb = HillClimb(GRID, max_in_flight=3)
    tried = drive(climb, lambda x: float("inf"))  # inf is as failed as NaN
    assert len(tried) == 3 and climb.best() is None
    assert all(o.status == "failed" for o in climb.history)


def test_observe_checks_the_grid_and_refuses_revisits():
    climb = HillClimb(GRID)
    climb.observe(0.3, 0.9)  # a replayed trial that was never suggested is fine
    with pytest.raises(ValueError, match="already observed"):
        climb.observe(0.3, 0.8)
    with pytest.raises(ValueError, match="not on the grid"):
        climb.observe(0.35, 0.8)
    assert climb.suggest() == 0.5  # the start first
    climb.observe(0.5, 0.1)
    assert (climb.suggest(), climb.suggest()) == (0.2, 0.4)  # around the replayed incumbent


def test_minimise_mode():
    climb = HillClimb(GRID, mode="min")
    drive(climb, lambda x: (x - 0.2) ** 2)
    assert climb.best()[0] == 0.2


# --------------------------------------------------------------------------------------------
# Without Ray: the in-process runner and the trial log
# --------------------------------------------------------------------------------------------


def test_local_runner_records_exceptions_and_restarts_from_the_log(tmp_path):
    url = str(tmp_path / "trials.jsonl")
    f = concave(0.8)

    def fn(x):
        if x == 0.6:
            raise RuntimeError("out of memory")
        return {"val_acc": f(x), "seconds": 0.0}

    log = TrialLog(url, {"settings": 1})
    climb = HillClimb(GRID, max_in_flight=1)
    _run_local(climb, fn, log.record)
    recs = read_jsonl(url)
    assert [r["status"] for r in recs if r["value"] == 0.6] == ["failed"]
    assert "RuntimeError: out of memory" in next(r["error"] for r in recs if r["value"] == 0.6)

    again = HillClimb(GRID, max_in_flight=1)  # a restart: finished trials are reused
    assert TrialLog(url, {"settings": 1}).replay(again) == len(recs) - 1  # the failed one is retried
    assert len(read_jsonl(str(tmp_path / "trials.previous.jsonl"))) == len(recs)
    assert again.suggest() == 0.6
    assert TrialLog(url, {"settings": 2}).replay(HillClimb(GRID)) == 0


# --------------------------------------------------------------------------------------------
# The Searcher on real Ray Tune
# --------------------------------------------------------------------------------------------


def objective(fail_nan: float, fail_raise: float):
    def fn(x):  # a closure, so that Ray pickles it by value (the test module is not importable)
        t0 = time.time()
        time.sleep(0.5)
        if x == fail_raise:
            raise ValueError("diverged")
        return {"val_acc": math.nan if x == fail_nan else 1.0 - (x - 0.7) ** 2, "start": t0,
                "end": time.time()}
    return fn


def test_searcher_on_ray_tune_runs_trials_in_parallel(ray_local, tmp_path):
    from tune.searcher import run_on_ray

    records = []
    climb = HillClimb(GRID, max_in_flight=2)
    run_on_ray(climb, "x", objective(fail_nan=0.4, fail_raise=0.8), metric="val_acc",
               on_complete=records.append, max_concurrent=2,
               storage_path=str(tmp_path / "ray"), name="concave")
    assert climb.finished and climb.best()[0] == 0.7
    assert len(records) == len(climb.history) < len(GRID)
    status = {r["value"]: r for r in records}
    assert status[0.4]["status"] == "failed" and "not finite" in status[0.4]["error"]
    assert status[0.8]["status"] == "failed" and status[0.8]["metric"] is None
    assert "diverged" in status[0.8]["error"] or "raised" in status[0.8]["error"]
    assert 0.2 not in status  # behind the failed 0.4: never needed
    assert all(r["end"] > r["start"] for r in records if r["status"] == "ok")  # own keys kept
    assert "hostname" not in status[0.5]  # Ray's own keys are not
    spans = sorted((r["start"], r["end"]) for r in records if "start" in r)  # 0.5 with 0.4
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"no overlap: {spans}"


# --------------------------------------------------------------------------------------------
# Trials on digits, end to end with local Ray
# --------------------------------------------------------------------------------------------


def tiny_cfg(run_dir, **tune):
    return tiny_config(run_dir, seed=3,
                       eval={"model": "convnet", "epochs": 10, "batch_size": 32},
                       tune={"beta_step": 0.2, "alpha_step": 0.25, "beta_epoch_fraction": 0.2,
                             "alpha_iterations": 2, "max_concurrent": 2, **tune})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(tiny_cfg(tmp_path_factory.mktemp("tune_run")))


def test_validation_split_is_stratified_disjoint_seeded_and_shared_with_window(prepared):
    from distill.search import validation_index

    ds = load_configured(prepared.data)
    pool, val = validation_split(ds, 0.1, seed=3)
    assert not set(pool) & set(val) and len(pool) + len(val) == len(ds.y_train)
    assert np.bincount(ds.y_train[val].numpy()).tolist() == [3] * 10
    assert np.array_equal(val, validation_index(ds, fraction=0.1, seed=3))  # same rows
    assert not np.array_equal(val, validation_split(ds, 0.1, seed=4)[1])


def test_window_search_and_trials_share_the_epoch_rule_and_the_grid(prepared):
    """One rule each (distill/search.py): the window search rounded its short epochs with
    round() (2.5 -> 2) while the trials rounded half up (-> 3); both round half up now."""
    import dataclasses

    from distill.search import beta_grid, epoch_fraction, search_epochs

    cfg = dataclasses.replace(prepared, eval=dataclasses.replace(prepared.eval, epochs=5),
                              tune=dataclasses.replace(prepared.tune, beta_epoch_fraction=0.5,
                                                       alpha_epoch_fraction=0.2))
    assert search_epochs(cfg, 40, 300) == 3 and search_epochs(cfg, 40, 300, "alpha") == 1
    default = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, beta_epoch_fraction=None))
    assert epoch_fraction(default) == 0.1  # App. E: 10% unless CIFAR-10
    cifar = dataclasses.replace(default, data=dataclasses.replace(default.data, name="cifar10"))
    assert epoch_fraction(cifar) == 0.2 and epoch_fraction(cifar, "alpha") == 0.2
    assert beta_grid(0.2, 4, 30) == [0.0, 0.2, 0.4, 0.6, 0.8]  # 0.8 + 4/30 <= 1 < 1.0 + 4/30
    assert beta_grid(0.25, 10, 30) == [0.0, 0.25, 0.5]  # 0.75 + 1/3 > 1


def test_trial_windows_never_contain_validation_images(prepared):
    ds = load_configured(prepared.data)
    ctx = SearchContext(prepared, ds, load_scores(prepared.run_dir, "forgetting"))
    assert len(ctx.val) == 30 and ctx.pool_sizes == [27] * 10  # 3 of 30 per class held out
    assert ctx.beta_values() == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert not feasible_beta(0.9, ipc=4, pool_sizes=ctx.pool_sizes, min_class_size=30)
    for beta in ctx.beta_values():
        sel = ctx.selection(beta, 0.5)
        assert not set(sel.source_index.tolist()) & set(ctx.val.tolist())
        assert (ds.y_train[sel.source_index] == sel.labels).all()
    assert torch_equal(ctx.val_ds.x_test, ds.x_train[ctx.val])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_tune_end_to_end_on_digits_with_ray(prepared, ray_local):
    cfg = prepared
    summary = run_tune(cfg)
    out = storage.join(cfg.run_dir, "tune")
    for kind in ("beta", "alpha"):
        s = summary[kind]
        assert s["finished"] and s["new_trials"] == s["trials"] <= s["grid_size"]
        recs = [r for r in read_jsonl(storage.join(out, kind, "trials.jsonl"))
                if r.get("reference") is None]  # the β search also scores the random subset
        assert len(recs) == s["trials"] and all(r["status"] == "ok" for r in recs)
        assert all(0 <= r["metric"] <= 1 and r["epochs"] == 2 for r in recs)  # 20% of 10
        # one evaluation run per trial: a count of the validation samples it gets right
        assert all(abs(r["metric"] * r["n_val"] - round(r["metric"] * r["n_val"])) < 1e-4
                   for r in recs)
        # the augmentation of the row a trial stands for: window (DSA), SelMatch (combined)
        assert {r["augment"] for r in recs} == {"dsa" if kind == "beta" else "combined"}
        assert storage.size(storage.join(out, f"{kind}.png")) > 1000
    assert summary["beta"]["grid"] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert summary["alpha"]["grid"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    text = storage.read_text(storage.join(out, "selected.yaml"))
    assert "# alpha trials: 2 distillation iterations each (tune.alpha_iterations = 2" in text
    selected = yaml.safe_load(text)
    start = summary["start"]
    assert start["init"] in ("window", "random")
    assert selected == {"select": {"init": start["init"],
                                   "beta": summary["beta"]["best_value"]
                                   if start["init"] == "window" else None},
                        "distill": {"alpha": summary["alpha"]["best_value"]}}
    overlaid = load_config(None, {**tuned_overlay(cfg.run_dir), "data.train_per_class": 30})
    assert overlaid.select.beta == selected["select"]["beta"]
    # α trials distilled in their own directories, reading the main run's experts in place
    alpha_recs = read_jsonl(storage.join(out, "alpha", "trials.jsonl"))
    assert any(r["final_loss"] is not None for r in alpha_recs if r["value"] > 0)
    assert not storage.exists(storage.join(out, "alpha", "trials", "alpha_0.5000", "experts"))

    again = run_tune(cfg, use_ray=False)  # a restart reuses every finished trial
    assert again["beta"]["new_trials"] == 0 and again["alpha"]["new_trials"] == 0
    assert again["selected"] == summary["selected"]


def test_alpha_trial_budget_is_a_fraction_of_the_run_by_default(tmp_path):
    from tune.trials import alpha_trial_iterations

    cfg = tiny_config(tmp_path, distill={"iterations": 1000})
    assert cfg.tune.alpha_iterations is None
    assert alpha_trial_iterations(cfg) == round(cfg.tune.alpha_fraction * 1000)
    half = tiny_config(tmp_path, distill={"iterations": 1000}, tune={"alpha_fraction": 0.5})
    assert alpha_trial_iterations(half) == 500
    fixed = tiny_config(tmp_path, tune={"alpha_iterations": 7, "alpha_fraction": 0.5})
    assert alpha_trial_iterations(fixed) == 7
    assert alpha_trial_iterations(tiny_config(tmp_path, tune={"alpha_fraction": 0.01})) == 1


def test_tune_config_fields_are_validated():
    with pytest.raises(ConfigError) as err:
        tiny_cfg("/tmp/x", val_fraction=0.7, beta_bound=1.5, eval_runs=0)
    text = str(err.value)
    assert "tune.val_fraction must be in (0, 0.5], got 0.7" in text
    assert "tune.beta_bound must be in [0, 1], got 1.5" in text and "tune.eval_runs" in text


def test_tune_is_a_cli_command(monkeypatch):
    """``selmatch tune`` reaches run_tune with the loaded config (overrides applied), the Ray
    address and --no-ray; so does ``python -m tune``."""
    import tune.main as tune_main
    from launch.cli import _parser, main

    args, rest = _parser().parse_known_args(["tune", "--config", "f.yaml", "--ray-address",
                                             "auto", "--tune.beta_step", "0.05"])
    assert args.ray_address == "auto" and rest == ["--tune.beta_step", "0.05"]
    calls = []
    monkeypatch.setattr(tune_main, "run_tune", lambda cfg, **kw: calls.append((cfg, kw)))
    quick = "configs/quickstart.yaml"
    assert main(["tune", "--config", quick, "--ray-address", "auto", "--tune.beta_step",
                 "0.05"]) == 0
    assert tune_main.main(["--config", quick, "--no-ray", "--tune.alpha_step", "0.25"]) == 0
    (cfg, kw), (cfg2, kw2) = calls
    assert cfg.tune.beta_step == 0.05 and kw == {"ray_address": "auto", "use_ray": True}
    assert cfg2.tune.alpha_step == 0.25 and kw2 == {"ray_address": None, "use_ray": False}
