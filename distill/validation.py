"""Config validation: every field and the relations between fields, all problems at once.

Each problem names the field, the value and what is allowed ("distill.alpha must be in [0, 1],
got 1.5"); :func:`validate_config` raises one :class:`ConfigError` listing them all. Dataset facts
(class count, smallest class) come from the data registry without loading the data.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from distill import data as data_mod
from distill import storage
from distill.augment import AUGMENTS, TRAINING_AUGMENTS
from distill import models as models_mod
from distill.batching import resolve_config
from distill.config import ConfigError, RunConfig
from distill.imagefolder import MalformedFolderError
from distill.methods import CROP_FILLS, METHODS
from distill.scores import SCORE_KINDS
from distill.selection import INITS as SELECT_INITS
from distill.selection import window_fits
from distill.student import PRECISIONS, compile_choice

DISTILL_MODES = ("joint", "merge")


def _choice(problems: list[str], path: str, value: Any, allowed: tuple[str, ...] | list[str]) -> bool:
    if value not in allowed:
        problems.append(f"{path} must be one of {', '.join(allowed)}; got {value!r}")
        return False
    return True


def _non_finite(cfg: Any, prefix: str = "") -> list[str]:
    """Every float field (also inside lists) holding NaN or ±inf, by its dotted name.

    YAML reads ``.nan`` and ``.inf`` as floats, so they pass the type check; range checks do not
    catch NaN (every comparison with it is False). One generic pass covers every float field,
    present and future."""
    problems = []
    for f in dataclasses.fields(cfg):
        value, path = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            problems += _non_finite(value, f"{path}.")
            continue
        items = value if isinstance(value, list) else [value]
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{path} must be a finite number, got {v}")
                break
    return problems


@dataclass(frozen=True)
class Interval:
    """Where a numeric field's value may lie; None = unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def problem(self, path: str, value: float | None) -> str | None:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return None  # None = default; non-finite values are reported once by _non_finite
        lo, hi = self.lo, self.hi
        bad = (lo is not None and (value <= lo if self.lo_open else value < lo)) or (
            hi is not None and (value >= hi if self.hi_open else value > hi))
        if not bad:
            return None
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        return f"{path} must be in {left}{lo_s}, {hi_s}{right}, got {value:g}"


_COUNT, _NON_NEGATIVE, _POSITIVE = Interval(1), Interval(0), Interval(0, lo_open=True)
_MOMENTUM, _SHARE, _PROBABILITY = Interval(0, 1, hi_open=True), Interval(0, 1, lo_open=True), \
    Interval(0, 1)

RANGES: dict[str, Interval] = {
    "seed": _NON_NEGATIVE,
    "data.train_per_class": _COUNT,
    "model.width": _COUNT, "model.depth": _COUNT,
    "experts.num_experts": _COUNT, "experts.epochs": _COUNT, "experts.lr": _POSITIVE,
    "experts.momentum": _MOMENTUM, "experts.weight_decay": _NON_NEGATIVE,
    "experts.batch_size": _COUNT, "experts.num_cpus": _NON_NEGATIVE,
    "experts.num_gpus": _NON_NEGATIVE,
    "select.ipc": _COUNT, "select.beta": Interval(0, 1, hi_open=True),
    "distill.alpha": _PROBABILITY, "distill.iterations": _NON_NEGATIVE,
    "distill.syn_steps": _COUNT, "distill.expert_epochs": _COUNT,
    "distill.max_start_epoch": _COUNT, "distill.batch_syn": _COUNT, "distill.bn_group": _COUNT,
    "distill.lr_images": _POSITIVE, "distill.lr_lr": _NON_NEGATIVE,
    "distill.syn_lr_init": _POSITIVE, "distill.momentum": _MOMENTUM,
    "distill.checkpoint_every": _COUNT, "distill.log_every": _COUNT,
    "distill.max_lr_change": _POSITIVE,
    "distill.check_every": _COUNT, "distill.num_threads": _COUNT,
    "distill.max_image_ratio": Interval(1, lo_open=True),
    "distill.max_loss_ratio": Interval(1, lo_open=True),
    "distill.groups_per_call": _COUNT, "distill.group_ranks": _COUNT,
    "eval.runs": _COUNT, "eval.epochs": _COUNT, "eval.width": _COUNT, "eval.depth": _COUNT, "eval.lr": _POSITIVE, "eval.momentum": _MOMENTUM,
    "eval.weight_decay": _NON_NEGATIVE, "eval.batch_size": _COUNT,
    "eval.num_cpus": _NON_NEGATIVE, "eval.num_gpus": _NON_NEGATIVE,
    "tune.beta_step": _SHARE, "tune.alpha_step": _SHARE, "tune.beta_epoch_fraction": _SHARE,
    "tune.alpha_iterations": _COUNT, "tune.alpha_fraction": _SHARE,
    "tune.alpha_epoch_fraction": _SHARE, "tune.val_fraction": Interval(0, 0.5, lo_open=True),
    "tune.eval_runs": _COUNT, "tune.beta_bound": _PROBABILITY, "tune.alpha_bound": _PROBABILITY,
    "tune.beta_start": _PROBABILITY, "tune.alpha_start": _PROBABILITY,
    "tune.max_concurrent": _COUNT, "tune.num_cpus": _NON_NEGATIVE,
    "tune.num_gpus": _NON_NEGATIVE,
}
"""The interval of every numeric field with a fixed one (experts.el2n_epoch's upper end is
experts.epochs, checked beside the others)."""


def _field(cfg: RunConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate_config(cfg: RunConfig) -> RunConfig:
    """Check every field and the relations between them; raise one ConfigError listing all."""
    problems: list[str] = _non_finite(cfg)
    if (problem := storage.run_dir_problem(cfg.run_dir)) is not None:
        problems.append(problem)
    problems += [p for path, interval in RANGES.items()
                 if (p := interval.problem(path, _field(cfg, path))) is not None]
    if cfg.seeds is not None:
        if not cfg.seeds:
            problems.append("seeds must list at least one seed (or be null for [seed]), got []")
        for s in cfg.seeds:
            if s < 0:
                problems.append(f"seeds must hold integers >= 0, got {s}")
        if len(set(cfg.seeds)) != len(cfg.seeds):
            problems.append(f"seeds must not repeat a seed, got {cfg.seeds}")
    info = None
    if _choice(problems, "data.name", cfg.data.name, data_mod.dataset_names()):
        try:
            info = data_mod.get_info(cfg.data.name, train_per_class=cfg.data.train_per_class,
                                     options=cfg.data.options, root=cfg.data.root)
        except (data_mod.DatasetNotFoundError, MalformedFolderError) as err:
            problems.append(f"data.root: {err}")  # only imagefolder reads files here
        except ValueError as err:
            problems.append(f"data.options: {err}")
        if info is not None and info.num_classes < 2:
            problems.append(f"data: {info.name} has {info.num_classes} class (a dataset to "
                            f"distil needs at least 2: nothing tells a class apart from none)")
            info = None

    models = models_mod.model_names()
    _choice(problems, "model.name", cfg.model.name, models)
    _choice(problems, "model.norm", cfg.model.norm, models_mod.NORMS)
    _choice(problems, "eval.model", cfg.eval.model, models)
    if cfg.eval.norm is not None:
        _choice(problems, "eval.norm", cfg.eval.norm, models_mod.NORMS)
    _choice(problems, "eval.crop_fill", cfg.eval.crop_fill, CROP_FILLS)

    ex = cfg.experts
    _choice(problems, "experts.augment", ex.augment, list(TRAINING_AUGMENTS))
    if problem := Interval(1, ex.epochs).problem("experts.el2n_epoch", ex.el2n_epoch):
        problems.append(problem)

    if _choice(problems, "scores.kind", cfg.scores.kind, list(SCORE_KINDS)):
        if cfg.scores.kind == "cscore" and not cfg.scores.file:
            problems.append("scores.file is required when scores.kind is cscore "
                            "(C-scores cannot be computed here; e.g. configs/scores/cscores_CIFAR10.npz)")
    for name in ("scores.file", "scores.topk_file"):
        if (problem := storage.file_problem(name, _field(cfg, name))) is not None:
            problems.append(problem)
    if _choice(problems, "scores.topk", cfg.scores.topk, list(SCORE_KINDS)):
        if (SCORE_KINDS[cfg.scores.topk].from_experts is None and not cfg.scores.topk_file
                and cfg.scores.topk != cfg.scores.kind):
            problems.append(f"scores.topk_file is required when scores.topk is {cfg.scores.topk} "
                            f"(it cannot be computed from experts)")

    sel = cfg.select
    _choice(problems, "select.init", sel.init, SELECT_INITS)
    if info is not None and sel.ipc >= 1:
        n_c = info.min_class_size
        if sel.ipc > n_c:
            problems.append(f"select.ipc ({sel.ipc}) is larger than the smallest class of "
                            f"{info.name} ({n_c} training samples)")
        elif (sel.init in ("auto", "window") and sel.beta is not None
              and not window_fits(sel.beta, sel.ipc, n_c)):
            problems.append(
                f"select.beta ({sel.beta:g}) + select.ipc / class size ({sel.ipc}/{n_c} = "
                f"{sel.ipc / n_c:.4g}) must be <= 1 so the window fits in the class; "
                f"use select.beta <= {1 - sel.ipc / n_c:.4g}")

    d = cfg.distill
    _choice(problems, "distill.mode", d.mode, DISTILL_MODES)
    _choice(problems, "distill.augment", d.augment, list(TRAINING_AUGMENTS))
    try:
        compile_choice(d.compile)
    except ValueError as err:
        problems.append(str(err))
    _choice(problems, "distill.precision", d.precision, PRECISIONS)
    if d.max_start_epoch + d.expert_epochs > ex.epochs:
        problems.append(
            f"distill.max_start_epoch + distill.expert_epochs ({d.max_start_epoch} + "
            f"{d.expert_epochs}) must be <= experts.epochs ({ex.epochs}): the target "
            f"epoch t + M must exist in every expert trajectory")
    if info is not None and sel.ipc >= 1:
        total = sel.ipc * info.num_classes
        if d.batch_syn is not None and d.batch_syn > total:
            problems.append(f"distill.batch_syn ({d.batch_syn}) exceeds the synthetic set size "
                            f"(select.ipc x classes = {total})")
        problems += resolve_config(cfg, info.num_classes).problems()  # |b| and g, as distilled

    ev = cfg.eval
    if ev.augment is not None:
        _choice(problems, "eval.augment", ev.augment, sorted(AUGMENTS))
    if ev.methods is not None:
        if not ev.methods:
            problems.append("eval.methods must name at least one row (or be null for the "
                            "paper's set), got []")
        for name in ev.methods:
            _choice(problems, "eval.methods", name, list(METHODS))

    if cfg.metrics.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("metrics.tensorboard is true but the tensorboard package is not "
                        "installed (pip install tensorboard, or selmatch's [tensorboard] extra)")

    if problems:
        raise ConfigError(problems)
    return cfg
