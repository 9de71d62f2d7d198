"""``selmatch tune``: the paper's App. E search for β, then α with β fixed, on Ray Tune.

    selmatch tune --config configs/quickstart.yaml                     # local Ray, all cores
    selmatch tune --config configs/cifar10_ipc500.yaml --ray-address auto \\
        --tune.beta_bound 0.5 --tune.alpha_bound 0.6   # optima at IPC 250 bound those at 500
    python -m tune --config configs/quickstart.yaml --no-ray           # in-process, no Ray
    python -m tune --config configs/quickstart.yaml --tune.alpha_iterations 20   # CPU smoke run
                                                   # (default: tune.alpha_fraction of distill.iterations)

Needs the run's experts and scores (``selmatch experts``, ``selmatch scores``; a missing one is
named with the command that makes it). Writes, under ``<run_dir>/tune/``:

    beta/trials.jsonl, alpha/trials.jsonl   one line per finished trial (value, val_acc, status,
                                            epochs, seconds, error, the validation images each
                                            network got right), rewritten atomically
    alpha/trials/alpha_<a>/                 each α trial's distillation (a run directory)
    selected.yaml                           the choice as a config overlay (select.beta,
                                            distill.alpha); its header names the validation
                                            split and repeats every warning of the decision
    beta.png, alpha.png                     metric vs value, failed trials marked
    summary.json                            trials run vs grid size, the decisions, seconds

Trials are scored on the run's validation split, never on the test set, and a choice that is not
better than the other values beyond the noise is a warning with the tie rule applied
(distill/search.py). Running the same command again reuses the finished trials of
``trials.jsonl`` (the failed ones are retried) when the settings that change a trial's metric are
unchanged. Apply the choice with ``selmatch distill --config F --select.beta B --distill.alpha A``
(:func:`selected_overrides` returns those overrides).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import logging
import math
import os
import time
from collections.abc import Callable

import yaml

from distill import integrity, storage
from distill.artifacts import Ref, digest
from distill.config import ConfigError, RunConfig
from distill.config_io import load_config, save_config
from distill.data import load_configured
from distill.freshness import Freshness
from distill.lock import check_not_busy, run_dir_lock
from distill.metrics import JsonlSink, read_jsonl
from distill.scores import load_scores
from distill.search import Decision, Point, SearchContext, decide, decide_start, make_grid
from distill.selection import Start
from launch.exits import arguments_text, run_guarded
from tune.search import HillClimb
from tune.trials import METRIC, alpha_trial, alpha_trial_iterations, beta_trial

log = logging.getLogger(__name__)



def tune_dir(cfg: RunConfig) -> str:
    return storage.join(cfg.run_dir, "tune")


def trial_made_of(check: Freshness, kind: str, start: Start | None = None) -> dict:
    """What a trial's metric depends on (distill/artifacts.py, ``beta_trials`` /
    ``alpha_trials``): stored with each record, whose ``settings`` is its stamp; trials recorded
    under another stamp are redone. An α trial also depends on the start it distils from."""
    more = {"start": start.to_dict()} if start is not None else None
    return check.wanted(Ref(f"{kind}_trials"), more=more)


# --------------------------------------------------------------------------------------------
# One search: replay what is recorded, run the rest (on Ray or in-process), record each trial
# --------------------------------------------------------------------------------------------


class TrialLog:
    """``<run_dir>/tune/<kind>/trials.jsonl``: read at the start, rewritten after every trial;
    each record carries the stamp of what made it (``settings``) and its ``made_of``."""

    def __init__(self, url: str, made: dict):
        self.url, self.made, self.settings = url, made, digest(made)
        self.sink = JsonlSink(url, checked=True)

    def _recorded(self) -> list[dict]:
        """The file's records, verified; a damaged file is moved aside (a warning) and its
        trials are run again."""
        try:
            text = integrity.read_text(self.url, fix="its trials are run again")
            return [integrity.parse_json(self.url, line, fix="its trials are run again")
                    for line in text.splitlines() if line.strip()]
        except integrity.DamagedArtifactError as err:
            aside = self.url + ".damaged"
            storage.write_bytes(aside, storage.read_bytes(self.url))
            integrity.remove(self.url)
            log.warning("%s (moved aside to %s)", err, aside)
            return []

    def replay(self, climb: HillClimb, *, retry_failed: bool = True) -> int:
        """Feed the recorded trials of these settings to ``climb``; returns how many."""
        if not storage.exists(self.url):
            return 0
        recorded = self._recorded()
        reused = []
        for rec in recorded:
            if rec.get("settings") != self.settings:
                continue
            if rec.get("reference") is not None:  # the random subset, scored apart
                reused.append(rec)
                continue
            if retry_failed and rec.get("status") != "ok":
                continue
            try:
                climb.observe(rec["value"], rec.get("metric"))
            except ValueError as err:  # off this grid, or recorded twice
                log.info("not reusing %s: %s", rec.get("value"), err)
                continue
            reused.append({**rec, "reused": True})
        skipped = len(recorded) - len(reused)
        if skipped and storage.exists(self.url):  # keep them: the file describes this search
            previous = self.url.removesuffix(".jsonl") + ".previous.jsonl"
            storage.write_text(previous, storage.read_text(self.url))
            log.info("%s: %d recorded trial(s) not reused (other settings, failed or off-grid); "
                     "the old file is kept as %s", self.url, skipped, previous)
        self.sink.records = reused  # the file describes this search from now on
        if reused:
            self.sink.flush()
        return sum(1 for r in reused if r.get("reference") is None)  # grid trials

    def record(self, rec: dict) -> None:
        self.sink.write({**rec, "settings": self.settings, "made_of": self.made,
                         "reused": False})
        self.sink.flush()

    def reference(self, name: str) -> dict | None:
        """The recorded reference point ``name`` of these settings (None: not scored yet)."""
        found = [r for r in self.sink.records if r.get("reference") == name and
                 r.get("settings") == self.settings and r.get("status", "ok") == "ok"]
        return found[-1] if found else None


def _run_local(climb: HillClimb, fn: Callable[[float], dict], on_complete) -> None:
    """The same search without Ray, one trial at a time (for hosts without Ray's wheel)."""
    while (value := climb.suggest()) is not None:
        try:
            out = fn(value)
        except Exception as err:  # a failed trial, never a success; the walk goes on
            log.warning("trial %g failed: %s: %s", value, type(err).__name__, err)
            out = {METRIC: math.nan, "error": f"{type(err).__name__}: {err}"}
        obs = climb.observe(value, out.get(METRIC))
        rec = {**obs.to_dict(), **{k: v for k, v in out.items() if k != METRIC}}
        if obs.status == "failed" and "error" not in rec:
            rec["error"] = f"{METRIC} missing or not finite: {out.get(METRIC)!r}"
        on_complete(rec)


def run_search(cfg: RunConfig, kind: str, climb: HillClimb, fn: Callable[[float], dict], *,
               made: dict, use_ray: bool, constants: dict | None = None,
               references: dict[str, Callable[[], dict]] | None = None) -> dict:
    """Replay, run the rest of ``climb`` (and score each of ``references`` once), and return
    its summary (with reused/new counts; the choice is :func:`decision`'s, made from the trial
    records)."""
    trials = TrialLog(storage.join(tune_dir(cfg), kind, "trials.jsonl"), made)
    reused = trials.replay(climb)
    log.info("%s search: grid %s, start %g, %d trial(s) reused", kind, climb.grid,
             climb.grid[climb.start], reused)
    t0 = time.perf_counter()
    if use_ray:
        from tune.searcher import run_on_ray

        run_on_ray(climb, kind, fn, metric=METRIC, constants=constants,
                   on_complete=trials.record, num_cpus=cfg.tune.num_cpus,
                   num_gpus=cfg.tune.num_gpus, max_concurrent=cfg.tune.max_concurrent,
                   storage_path=_ray_storage(cfg),
                   name=f"{kind}_{time.strftime('%Y%m%d-%H%M%S')}")
    else:
        _run_local(climb, fn, trials.record)
    for name, score in (references or {}).items():  # in this process: one trial each
        if trials.reference(name) is None:
            trials.record({"reference": name, "value": None, "status": "ok", **score()})
    summary = {**climb.summary(), "reused": reused, "new_trials": len(climb.history) - reused,
               "seconds": round(time.perf_counter() - t0, 1), "records": list(trials.sink.records),
               "references": {n: trials.reference(n) for n in references or {}}}
    if not summary["finished"]:
        raise RuntimeError(f"the {kind} search stopped before the climb finished (Ray ended "
                           f"with trials outstanding); run the command again to continue")
    if summary["best_value"] is None:
        raise RuntimeError(f"every {kind} trial failed; the errors are in "
                           f"{storage.join(tune_dir(cfg), kind, 'trials.jsonl')}")
    return summary


def _ray_storage(cfg: RunConfig) -> str | None:
    """Ray's own experiment files beside ours for a local run_dir; Ray's default otherwise."""
    path = storage.local_path(cfg.run_dir)
    return os.path.abspath(os.path.join(path, "tune", "ray")) if path is not None else None


# --------------------------------------------------------------------------------------------
# Trial functions as picklable callables (they travel to Ray workers)
# --------------------------------------------------------------------------------------------


def alpha_trial_dir(cfg: RunConfig, alpha: float) -> str:
    return storage.join(tune_dir(cfg), "alpha", "trials", f"alpha_{alpha:.4f}")


def _alpha_fn(alpha: float, *, ctx: SearchContext, start: Start) -> dict:
    return alpha_trial(ctx, alpha, start=start, trial_dir=alpha_trial_dir(ctx.cfg, alpha))


# --------------------------------------------------------------------------------------------
# The two searches and their outputs
# --------------------------------------------------------------------------------------------


def beta_climb(cfg: RunConfig, ctx: SearchContext) -> HillClimb:
    values = ctx.beta_values()
    if not values:
        raise ConfigError([f"no beta in steps of tune.beta_step {cfg.tune.beta_step:g} fits "
                           f"select.ipc {cfg.select.ipc} in the class pools {ctx.pool_sizes}"])
    grid = make_grid(values[0], values[-1], cfg.tune.beta_step, bound=cfg.tune.beta_bound)
    return HillClimb(grid, start=cfg.tune.beta_start, max_in_flight=cfg.tune.max_concurrent)


def alpha_climb(cfg: RunConfig) -> HillClimb:
    grid = make_grid(0.0, 1.0, cfg.tune.alpha_step, bound=cfg.tune.alpha_bound)
    return HillClimb(grid, start=cfg.tune.alpha_start, max_in_flight=cfg.tune.max_concurrent)


def plot_search(kind: str, history: list[dict], grid: list[float], best: float, url: str) -> None:
    """Metric vs value: successful trials joined in value order, failed ones as red crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r["value"], r["metric"]) for r in history if r["status"] == "ok")
    failed = [r["value"] for r in history if r["status"] != "ok"]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    if ok:
        ax.plot(*zip(*ok), "o-", color="tab:blue", label="trial")
        ax.plot([best], [dict(ok)[best]], "*", color="tab:orange", markersize=14, label="chosen")
    if failed:
        low = min((m for _, m in ok), default=0.0)
        ax.plot(failed, [low] * len(failed), "x", color="tab:red", markersize=9, label="failed")
    ax.set_xticks(grid)
    ax.tick_params(axis="x", labelrotation=90 if len(grid) > 12 else 0)
    ax.set_xlabel(kind)
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{kind}: {len(history)} of {len(grid)} grid values tried")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())


def decision(kind: str, climb: HillClimb, records: list[dict], ctx: SearchContext) -> Decision:
    """The search's choice by distill/search.py's rule, from this search's trial records."""
    points = {r["value"]: Point.from_record(r) for r in records
              if r.get("status") == "ok" and r.get("reference") is None}
    return decide(points, start=climb.grid[climb.start], chance=ctx.chance, kind=kind)


def write_selected(cfg: RunConfig, beta: Decision, start: dict, alpha: Decision,
                   split: dict) -> str:
    """``selected.yaml``: the chosen start and α as a config overlay (``selmatch run --tuned``
    applies it); the header says how they were chosen, on which validation split, and repeats
    every warning."""
    url = storage.join(tune_dir(cfg), "selected.yaml")
    iters = alpha_trial_iterations(cfg)
    budget = (f"tune.alpha_iterations = {iters}" if cfg.tune.alpha_iterations is not None else
              f"tune.alpha_fraction {cfg.tune.alpha_fraction:g} x distill.iterations "
              f"{cfg.distill.iterations}")
    values = {"select": {"init": start["init"], "beta": start["beta"]},
              "distill": {"alpha": alpha.value}}
    lines = [f"selmatch tune: chosen on validation accuracy, never on the test set. Apply with "
             f"`selmatch run --tuned` (or --select.init {start['init']}"
             + (f" --select.beta {start['beta']:g}" if start["beta"] is not None else "")
             + f" --distill.alpha {alpha.value:g})",
             f"validation split: {split['validation_size']} training images "
             f"({split['validation_fraction']:g} of each class, drawn from seed "
             f"{split['validation_seed']}), held out of every trial's pool of "
             f"{split['pool_size']}; {split['runs_per_point']} network(s) per trial",
             f"alpha trials: {iters} distillation iterations each ({budget}; "
             f"bench/results/alpha_budget.md measures the choice)",
             f"rule: {beta.rule}",
             f"start: {start['why']}"]
    for d in (beta, alpha):
        lines.append(f"{d.kind}: chose {d.value:g} ({100 * d.metric:.2f}%); best {d.best:g}; "
                     f"tied with the best: {', '.join(f'{v:g}' for v in d.tied)}")
        lines += [f"WARNING: {w}" for w in d.warnings]
    header = "".join(f"# {line}\n" for line in lines)
    integrity.write_text(url, header + yaml.safe_dump(values, sort_keys=False))
    return url


def _records(cfg: RunConfig, kind: str) -> list[dict]:
    """The trials of the grid (not the reference points)."""
    return [r for r in read_jsonl(storage.join(tune_dir(cfg), kind, "trials.jsonl"))
            if r.get("reference") is None]


def run_tune(cfg: RunConfig, *, ray_address: str | None = None, use_ray: bool = True) -> dict:
    """β search, SelMatch's start, then the α search from that start; writes selected.yaml,
    plots, summary.json."""
    local = storage.local_path(cfg.run_dir)
    if local is not None:  # Ray runs trials in their own working directory
        cfg = dataclasses.replace(cfg, run_dir=os.path.abspath(local))
    check_not_busy(cfg.run_dir)
    Freshness(cfg).require("tune")
    if use_ray and cfg.run_dir.startswith("memory://"):
        raise ValueError(f"run_dir {cfg.run_dir} lives in this process's memory, which Ray's "
                         f"trial processes cannot write: use --no-ray, or a run_dir on storage "
                         f"every worker reaches")
    storage.check_writable(cfg.run_dir)
    with run_dir_lock(cfg.run_dir, "selmatch tune"):
        return _run_tune(cfg, ray_address=ray_address, use_ray=use_ray)


def tune_start(cfg: RunConfig, beta: Decision, points: dict, random: Point) -> dict:
    """SelMatch's start after the β search: the config's when it pins one (select.init random
    or topk: that start; window: the searched β), else the window search's rule
    (distill/search.py ``decide_start``) on the same validation points."""
    init = cfg.select.init
    if init in ("random", "topk"):
        return {"init": init, "beta": None, "why": f"select.init {init} pins the start"}
    if init == "window":
        return {"init": "window", "beta": beta.value,
                "why": f"select.init window: the window at the searched β = {beta.value:g}"}
    return decide_start(points[beta.value], random, beta.value)


def _run_tune(cfg: RunConfig, *, ray_address: str | None, use_ray: bool) -> dict:
    ds = load_configured(cfg.data)
    scores = load_scores(cfg.run_dir, cfg.scores.kind)
    ctx = SearchContext(cfg, ds, scores)
    check = Freshness(cfg, ds)
    save_config(cfg)
    started = False
    if use_ray:
        from launch.ray_utils import init_ray

        started = init_ray(ray_address)
    t0 = time.perf_counter()
    try:
        climb = beta_climb(cfg, ctx)
        beta_sum = run_search(cfg, "beta", climb, functools.partial(beta_trial, ctx),
                              made=trial_made_of(check, "beta"), use_ray=use_ray,
                              references={"random": lambda: ctx.reference_point("random")})
        records = beta_sum.pop("records")
        beta = decision("beta", climb, records, ctx)
        points = {r["value"]: Point.from_record(r) for r in records
                  if r.get("status") == "ok" and r.get("reference") is None}
        start_rec = tune_start(cfg, beta, points,
                               Point.from_record(beta_sum["references"]["random"]))
        start = Start(start_rec["init"], start_rec["beta"], "tune")
        log.info("start: %s", start_rec["why"])
        climb = alpha_climb(cfg)
        alpha_sum = run_search(cfg, "alpha", climb,
                               functools.partial(_alpha_fn, ctx=ctx, start=start),
                               made=trial_made_of(check, "alpha", start), use_ray=use_ray,
                               constants={"start": start.to_dict()})
        alpha = decision("alpha", climb, alpha_sum.pop("records"), ctx)
    finally:
        if started:
            import ray

            ray.shutdown()
    out = tune_dir(cfg)
    for kind, summ, dec in (("beta", beta_sum, beta), ("alpha", alpha_sum, alpha)):
        summ["decision"] = dec.to_dict()
        plot_search(kind, _records(cfg, kind), summ["grid"], dec.value,
                    storage.join(out, f"{kind}.png"))
    split = ctx.describe()
    selected_yaml = write_selected(cfg, beta, start_rec, alpha, split)
    check.forget()
    made = check.wanted(Ref("tuned"))
    summary = {"beta": beta_sum, "alpha": alpha_sum, "start": start_rec,
               "selected": {"select.init": start.init, "select.beta": start.beta,
                            "distill.alpha": alpha.value},
               "metric": f"{METRIC} on the validation split (tune.val_fraction "
                         f"{cfg.tune.val_fraction:g})",
               "n_val": len(ctx.val), "split": split, "ray": use_ray,
               "seconds": round(time.perf_counter() - t0, 1),
               "warnings": beta.warnings + alpha.warnings, "selected_yaml": selected_yaml,
               "stamp": digest(made), "made_of": made}
    integrity.write_json(storage.join(out, "summary.json"), summary)
    for kind, dec in (("beta", beta), ("alpha", alpha)):
        s = summary[kind]
        log.info("%s: %d of %d grid values tried (%d reused, %d failed), chose %g (%s %.4f; "
                 "best %g)", kind, s["trials"], s["grid_size"], s["reused"], s["failed"],
                 dec.value, METRIC, dec.metric, dec.best)
        for w in dec.warnings:
            log.warning("%s", w)
    log.info("selected %s, distill.alpha %g -> %s (apply with selmatch run --tuned)",
             start.describe(), alpha.value, selected_yaml)
    return summary


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def cmd_tune(args, overrides: list[str]) -> int:
    """``selmatch tune --config F [--ray-address A]``."""
    run_tune(load_config(args.config, overrides), ray_address=args.ray_address,
             use_ray=not args.no_ray)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--config", required=True, help="YAML config (path or fsspec URL)")
    parser.add_argument("--ray-address", default=None, help="join a Ray cluster (e.g. auto)")
    parser.add_argument("--no-ray", action="store_true",
                        help="run the trials one after another in this process, without Ray")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    return run_guarded("tune", lambda: cmd_tune(args, overrides),  # exits: launch/exits.py
                       arguments=arguments_text(args.config, overrides))
