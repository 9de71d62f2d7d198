"""Config validation: every field and the relations between fields, all problems at once.

Each problem names the field, the value and what is allowed ("distill.alpha must be in [0, 1],
got 1.5"); :func:`validate_config` raises one :class:`ConfigError` listing them all. Dataset facts
(class count, smallest class) come from the data registry without loading the data.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

from distill import data as data_mod
from distill.augment import AUGMENTS, TRAINING_AUGMENTS
from distill import models as models_mod
from distill.batching import resolve_config
from distill.config import ConfigError, RunConfig
from distill.imagefolder import MalformedFolderError
from distill.methods import METHODS
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


def _range(problems: list[str], path: str, value: float | None, lo: float | None = None,
           hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return  # None = default; non-finite values are reported once by _non_finite
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        problems.append(f"{path} must be in {left}{lo_s}, {hi_s}{right}, got {value:g}")


def validate_config(cfg: RunConfig) -> RunConfig:
    """Check every field and the relations between them; raise one ConfigError listing all."""
    problems: list[str] = _non_finite(cfg)
    _range(problems, "seed", cfg.seed, 0)
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
    _range(problems, "data.train_per_class", cfg.data.train_per_class, 1)

    models = models_mod.model_names()
    _choice(problems, "model.name", cfg.model.name, models)
    _choice(problems, "model.norm", cfg.model.norm, models_mod.NORMS)
    _range(problems, "model.width", cfg.model.width, 1)
    _range(problems, "model.depth", cfg.model.depth, 1)
    _choice(problems, "eval.model", cfg.eval.model, models)

    ex = cfg.experts
    _range(problems, "experts.num_experts", ex.num_experts, 1)
    _range(problems, "experts.epochs", ex.epochs, 1)
    _range(problems, "experts.lr", ex.lr, 0, lo_open=True)
    _range(problems, "experts.momentum", ex.momentum, 0, 1, hi_open=True)
    _range(problems, "experts.weight_decay", ex.weight_decay, 0)
    _range(problems, "experts.batch_size", ex.batch_size, 1)
    _choice(problems, "experts.augment", ex.augment, list(TRAINING_AUGMENTS))
    _range(problems, "experts.el2n_epoch", ex.el2n_epoch, 1, ex.epochs)
    _range(problems, "experts.num_cpus", ex.num_cpus, 0)
    _range(problems, "experts.num_gpus", ex.num_gpus, 0)

    if _choice(problems, "scores.kind", cfg.scores.kind, list(SCORE_KINDS)):
        if cfg.scores.kind == "cscore" and not cfg.scores.file:
            problems.append("scores.file is required when scores.kind is cscore "
                            "(C-scores cannot be computed here; e.g. ../shared/scores/cscores_CIFAR10.npz)")
    if _choice(problems, "scores.topk", cfg.scores.topk, list(SCORE_KINDS)):
        if (SCORE_KINDS[cfg.scores.topk].from_experts is None and not cfg.scores.topk_file
                and cfg.scores.topk != cfg.scores.kind):
            problems.append(f"scores.topk_file is required when scores.topk is {cfg.scores.topk} "
                            f"(it cannot be computed from experts)")

    sel = cfg.select
    _choice(problems, "select.init", sel.init, SELECT_INITS)
    _range(problems, "select.ipc", sel.ipc, 1)
    _range(problems, "select.beta", sel.beta, 0, 1, hi_open=True)
    if info is not None and sel.ipc >= 1:
        n_c = info.min_class_size
        if sel.ipc > n_c:
            problems.append(f"select.ipc ({sel.ipc}) is larger than the smallest class of "
                            f"{info.name} ({n_c} training samples)")
        elif sel.init == "window" and not window_fits(sel.beta, sel.ipc, n_c):
            problems.append(
                f"select.beta ({sel.beta:g}) + select.ipc / class size ({sel.ipc}/{n_c} = "
                f"{sel.ipc / n_c:.4g}) must be <= 1 so the window fits in the class; "
                f"use select.beta <= {1 - sel.ipc / n_c:.4g}")

    d = cfg.distill
    _range(problems, "distill.alpha", d.alpha, 0, 1)
    _range(problems, "distill.iterations", d.iterations, 0)
    _range(problems, "distill.syn_steps", d.syn_steps, 1)
    _range(problems, "distill.expert_epochs", d.expert_epochs, 1)
    _range(problems, "distill.max_start_epoch", d.max_start_epoch, 1)
    _range(problems, "distill.batch_syn", d.batch_syn, 1)
    _range(problems, "distill.bn_group", d.bn_group, 1)
    _range(problems, "distill.lr_images", d.lr_images, 0, lo_open=True)
    _range(problems, "distill.lr_lr", d.lr_lr, 0)
    _range(problems, "distill.syn_lr_init", d.syn_lr_init, 0, lo_open=True)
    _range(problems, "distill.momentum", d.momentum, 0, 1, hi_open=True)
    _range(problems, "distill.checkpoint_every", d.checkpoint_every, 1)
    _range(problems, "distill.log_every", d.log_every, 1)
    _range(problems, "distill.check_every", d.check_every, 1)
    _range(problems, "distill.num_threads", d.num_threads, 1)
    _range(problems, "distill.max_image_ratio", d.max_image_ratio, 1, lo_open=True)
    _range(problems, "distill.max_loss_ratio", d.max_loss_ratio, 1, lo_open=True)
    _choice(problems, "distill.mode", d.mode, DISTILL_MODES)
    _choice(problems, "distill.augment", d.augment, list(TRAINING_AUGMENTS))
    try:
        compile_choice(d.compile)
    except ValueError as err:
        problems.append(str(err))
    _choice(problems, "distill.precision", d.precision, PRECISIONS)
    _range(problems, "distill.groups_per_call", d.groups_per_call, 1)
    _range(problems, "distill.group_ranks", d.group_ranks, 1)
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
    _range(problems, "eval.runs", ev.runs, 1)
    _range(problems, "eval.num_cpus", ev.num_cpus, 0)
    _range(problems, "eval.epochs", ev.epochs, 1)
    _range(problems, "eval.lr", ev.lr, 0, lo_open=True)
    _range(problems, "eval.momentum", ev.momentum, 0, 1, hi_open=True)
    _range(problems, "eval.weight_decay", ev.weight_decay, 0)
    _range(problems, "eval.batch_size", ev.batch_size, 1)
    _range(problems, "eval.num_cpus", ev.num_cpus, 0)
    _range(problems, "eval.num_gpus", ev.num_gpus, 0)
    if ev.augment is not None:
        _choice(problems, "eval.augment", ev.augment, sorted(AUGMENTS))
    if ev.methods is not None:
        if not ev.methods:
            problems.append("eval.methods must name at least one row (or be null for the "
                            "paper's set), got []")
        for name in ev.methods:
            _choice(problems, "eval.methods", name, list(METHODS))

    t = cfg.tune
    _range(problems, "tune.beta_step", t.beta_step, 0, 1, lo_open=True)
    _range(problems, "tune.alpha_step", t.alpha_step, 0, 1, lo_open=True)
    _range(problems, "tune.beta_epoch_fraction", t.beta_epoch_fraction, 0, 1, lo_open=True)
    _range(problems, "tune.alpha_iterations", t.alpha_iterations, 1)
    _range(problems, "tune.alpha_fraction", t.alpha_fraction, 0, 1, lo_open=True)
    _range(problems, "tune.alpha_epoch_fraction", t.alpha_epoch_fraction, 0, 1, lo_open=True)
    _range(problems, "tune.val_fraction", t.val_fraction, 0, 0.5, lo_open=True)
    _range(problems, "tune.eval_runs", t.eval_runs, 1)
    for name in ("beta_bound", "alpha_bound", "beta_start", "alpha_start"):
        _range(problems, f"tune.{name}", getattr(t, name), 0, 1)
    _range(problems, "tune.max_concurrent", t.max_concurrent, 1)
    _range(problems, "tune.num_cpus", t.num_cpus, 0)
    _range(problems, "tune.num_gpus", t.num_gpus, 0)

    if cfg.metrics.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("metrics.tensorboard is true but the tensorboard package is not "
                        "installed (pip install tensorboard, or selmatch's [tensorboard] extra)")

    if problems:
        raise ConfigError(problems)
    return cfg
