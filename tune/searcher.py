"""Ray Tune side of the search: the hill-climb as a ``Searcher``, and one search run on Ray.

    searcher = HillClimbSearcher(climb, "beta", metric="val_acc", mode="max")
    tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=searcher, metric="val_acc",
               mode="max", num_samples=len(climb.grid), max_concurrent_trials=2)).fit()

Trials run in parallel (both neighbours at once) up to ``max_concurrent_trials``; the searcher
returns ``Searcher.FINISHED`` when the climb has stopped, so Tune ends long before ``num_samples``.
A trial that raises (Ray marks it ERROR), reports NaN, or never reports the metric is observed as
failed: the walk treats it as the worst value and goes on.

Gotcha (docs/design.md §8): a Searcher whose ``set_search_properties`` is not overridden keeps
``metric = None`` when Tune passes metric/mode, and the search silently stops after a few
trials. Metric and mode are taken in the constructor and checked against Tune's.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import ray
from ray import tune
from ray.tune.search import Searcher

from tune.search import HillClimb

log = logging.getLogger(__name__)

OnComplete = Callable[[dict], None]


class HillClimbSearcher(Searcher):
    """Suggests ``{param: value, **constants}`` from a :class:`HillClimb`."""

    def __init__(self, climb: HillClimb, param: str, *, metric: str, mode: str,
                 constants: dict[str, Any] | None = None, on_complete: OnComplete | None = None):
        if mode != climb.mode:
            raise ValueError(f"searcher mode {mode!r} differs from the climb's {climb.mode!r}")
        super().__init__(metric=metric, mode=mode)
        self.climb, self.param = climb, param
        self.constants = dict(constants or {})
        self.on_complete = on_complete
        self._live: dict[str, float] = {}       # trial id -> value
        self._last: dict[str, dict] = {}        # trial id -> last reported result

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec) -> bool:
        """Accept Tune's metric/mode when they agree with ours (or fill them in)."""
        for name, given in (("metric", metric), ("mode", mode)):
            own = getattr(self, f"_{name}")
            if given is not None and own is not None and given != own:
                raise ValueError(f"Tune's {name} {given!r} differs from the searcher's {own!r}")
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a restarted search replays ``trials.jsonl`` instead (tune/main.py)."""

    def restore(self, checkpoint_path: str) -> None:
        """See :meth:`save`."""

    def suggest(self, trial_id: str) -> dict | str | None:
        value = self.climb.suggest()
        if value is None:
            return Searcher.FINISHED if self.climb.finished else None
        self._live[trial_id] = value
        return {**self.constants, self.param: value}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._last[trial_id] = dict(result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id not in self._live:
            return
        value = self._live.pop(trial_id)
        result = {**self._last.pop(trial_id, {}), **(result or {})}
        metric = None if error else result.get(self.metric)
        obs = self.climb.observe(value, metric)
        record = {**obs.to_dict(), "trial_id": trial_id}
        own = result.get(_KEYS, "").split(",")  # what the trial reported, not Ray's additions
        record.update({k: result[k] for k in own if k in result and k not in record
                       and k != self.metric})
        if error:
            record["error"] = result.get("error") or "the trial raised (see Ray's trial log)"
        elif obs.status == "failed" and "error" not in record:
            record["error"] = f"metric {self.metric!r} missing or not finite: {metric!r}"
        log.info("%s=%g: %s %s", self.param, value, obs.status,
                 "" if obs.metric is None else f"{self.metric} {obs.metric:.4f}")
        if self.on_complete is not None:
            self.on_complete(record)


# names of the keys the trial itself reported (Ray adds many of its own: timestamps, hosts, ...)
_KEYS = "trial_keys"


def _report_trial(config: dict, *, param: str, fn: Callable[[float], dict], metric: str) -> None:
    """Ray function trainable: run ``fn(value)`` and report its dict once."""
    try:
        out = fn(config[param])
    except Exception as err:
        # so that trials.jsonl can say why; re-raised so Ray marks the trial ERROR, never success
        tune.report({metric: math.nan, "error": f"{type(err).__name__}: {err}",
                     _KEYS: f"{metric},error"})
        raise
    out = {**out, "node": ray.get_runtime_context().get_node_id()}  # where it ran (trials.jsonl)
    tune.report({**out, _KEYS: ",".join(out)})


def run_on_ray(climb: HillClimb, param: str, fn: Callable[[float], dict], *, metric: str,
               constants: dict | None = None, on_complete: OnComplete | None = None,
               num_cpus: float = 1.0, num_gpus: float = 0.0, max_concurrent: int = 2,
               storage_path: str | None = None, name: str | None = None) -> None:
    """Drive ``climb`` to the end with Ray Tune; ``fn(value) -> dict`` runs inside each trial
    (it travels to the workers by pickle: make it a module-level function or a partial of one)."""
    if climb.finished:
        return
    searcher = HillClimbSearcher(climb, param, metric=metric, mode=climb.mode,
                                 constants=constants, on_complete=on_complete)
    trainable = tune.with_resources(
        tune.with_parameters(_report_trial, param=param, fn=fn, metric=metric),
        {"cpu": num_cpus, "gpu": num_gpus})
    remaining = len(climb.grid) - len(climb.history)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, metric=metric, mode=climb.mode,
                                    num_samples=remaining, max_concurrent_trials=max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    tuner.fit()
