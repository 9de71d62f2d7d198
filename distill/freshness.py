"""Freshness: one rule for every stage's artifact. It is fresh only if everything that made it matches.

Each stage declares, in :data:`STAGES`, the config fields its result depends on; the caller adds
the digests of the artifacts it read (expert files, the scores array, a synthetic set). A
:func:`stamp` is the hash of both, stored beside the artifact (a JSON manifest, or the ``meta`` of a
``.pt`` file). A stage reuses its artifact when the stored stamp equals the one computed now and
redoes it otherwise, so a changed field or a changed input (a retrained expert, new scores) makes
everything downstream stale without each stage keeping its own list of what matters.

What is deliberately left out: resources and bookkeeping that do not change a result's meaning
(``experts.num_cpus``, ``distill.checkpoint_every``, ``distill.num_threads``, ...). Distillation has
two stamps: ``distill`` (everything, iterations included: the finished set) and
``distill_resume`` (everything but the iteration count: a checkpoint that a longer run may
continue from).

    want = stamp(cfg, "scores", inputs={"experts": experts_digest(cfg)})
    if is_fresh(stored.get("stamp"), want): skip
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from distill.config import RunConfig, to_dict


@dataclass(frozen=True)
class StageFields:
    """Dotted config fields (a whole section, or ``section.field``) and fields excluded from them."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()


_RESOURCES = ("experts.num_cpus", "experts.num_gpus")
# how real rows are cropped and flipped: part of a result only where a row's augmentation has a
# crop + flip part, so the stages whose rows have one add them to the stamp themselves
_REAL_ROWS = ("eval.flip", "eval.crop_fill")
# how often to save, log and check, and how the same mathematics runs: eager or compiled, CUDA
# graphs, groups per call, ranks per BN group (equal results, tested; precision is kept: TF32
# changes the numbers)
_DISTILL_BOOKKEEPING = ("distill.checkpoint_every", "distill.log_every", "distill.check_every",
                        "distill.num_threads", "distill.compile", "distill.cuda_graphs",
                        "distill.groups_per_call", "distill.group_ranks")

STAGES: dict[str, StageFields] = {
    # one expert: its number is a pure function of these (how many experts is not among them)
    "expert": StageFields(("data", "model", "experts", "seed"),
                          ("experts.num_experts", *_RESOURCES)),
    "scores": StageFields(("data", "scores.kind", "scores.file", "scores.key")),
    "topk_scores": StageFields(("data", "scores.topk", "scores.topk_file")),
    # the window search: its grid, split, points' training and tie rule (distill/search.py)
    "window": StageFields(("data", "model", "select.ipc", "eval", "scores.topk", "tune.beta_step",
                           "tune.beta_epoch_fraction", "tune.val_fraction", "tune.eval_runs",
                           "tune.beta_start", "seed"),
                          ("eval.runs", "eval.methods", "eval.num_cpus", "eval.num_gpus",
                           *_REAL_ROWS)),
    "selection": StageFields(("data", "select", "distill.alpha", "seed")),
    "distill": StageFields(("data", "model", "select", "distill", "experts.lr", "seed"),
                           _DISTILL_BOOKKEEPING),
    "distill_resume": StageFields(("data", "model", "select", "distill", "experts.lr", "seed"),
                                  (*_DISTILL_BOOKKEEPING, "distill.iterations")),
    "evaluate": StageFields(("data", "eval", "seed"),
                            ("eval.methods", "eval.num_cpus", "eval.num_gpus", *_REAL_ROWS)),
    # trials of `selmatch tune` (grid steps, bounds, starts, resources only decide which values run
    # where, so a finer grid reuses the trials that lie on it)
    "beta_trial": StageFields(("data", "model", "experts", "scores", "eval", "seed", "select.ipc",
                               "tune.val_fraction", "tune.eval_runs", "tune.beta_epoch_fraction"),
                              ("eval.methods", "eval.num_cpus", "eval.num_gpus", *_RESOURCES,
                               *_REAL_ROWS)),
    "alpha_trial": StageFields(("data", "model", "experts", "scores", "eval", "seed", "select.ipc",
                                "tune.val_fraction", "tune.eval_runs", "tune.beta_epoch_fraction",
                                "tune.alpha_epoch_fraction", "distill"),
                               ("eval.methods", "eval.num_cpus", "eval.num_gpus", *_RESOURCES,
                                *_DISTILL_BOOKKEEPING,
                                "distill.alpha", "distill.iterations")),
}


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_fields(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """The config values ``stage`` depends on, by dotted name."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    spec = STAGES[stage]
    tree = to_dict(cfg)
    out: dict[str, Any] = {}
    for key in spec.include:
        value = _get(tree, key)
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    for key in spec.exclude:
        out.pop(key, None)
    return out


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def made_of(cfg: RunConfig, stage: str, *, inputs: dict[str, str] | None = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What makes an artifact of ``stage``: its config fields, the digests of the artifacts it
    reads (``inputs``), and anything else that decides it (``extra``, e.g. a row's augmentation).
    Stored beside the stamp where a message may have to say what changed (:func:`explain`)."""
    return {"stage": stage, "fields": stage_fields(cfg, stage), "inputs": dict(inputs or {}),
            "extra": dict(extra or {})}


def stamp(cfg: RunConfig, stage: str, *, inputs: dict[str, str] | None = None,
          extra: dict[str, Any] | None = None) -> str:
    """The hash of :func:`made_of`: equal stamps, same artifact."""
    return digest(made_of(cfg, stage, inputs=inputs, extra=extra))


def is_fresh(stored: str | None, wanted: str) -> bool:
    return stored is not None and stored == wanted


def explain(stored: dict[str, Any] | None, wanted: dict[str, Any], limit: int = 4) -> str:
    """What differs between what made an artifact (``stored``, a :func:`made_of`) and what the
    config asks for now, in words: ``distill.alpha 0.5 → 0.3; other scores``."""
    if not stored:
        return "its settings are not recorded (made by an older version)"
    parts = []
    old, new = stored.get("fields", {}), wanted["fields"]
    parts += [f"{k} {old.get(k)!r} → {v!r}" for k, v in new.items() if old.get(k) != v]
    parts += [f"{k} {v!r} → (none)" for k, v in old.items() if k not in new]
    for key, what in (("inputs", "other {}"), ("extra", "another {}")):
        a, b = stored.get(key, {}), wanted[key]
        parts += [what.format(k) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not parts:
        return "made by another version of the code"
    more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more
