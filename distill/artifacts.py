"""The stage table: every artifact of a run, where it lives, what it is made of, what it reads,
which version of the code makes it and which command. Nothing else decides these.

| artifact | path (run dir; per seed: the repetition's) | made of (config) | reads | made by |
| --- | --- | --- | --- | --- |
| experts | ``experts/manifest.json`` + one file each | data, model, experts.* but resources, seed | | ``selmatch experts`` |
| scores | ``scores/<kind>.npy`` | data, scores.kind/file/key (top-k's: scores.topk/topk_file/key) | experts, unless imported | ``selmatch scores`` |
| window | ``window/results.json`` | data, select.ipc, seed, eval.* (training), the β grid and split (tune.*) | scores | ``selmatch window`` |
| selection | ``synset/<row>.pt`` (random, topk, window, init) | data, select.ipc, seed; init: select.init/beta | scores, window (as the row needs) | ``selmatch run`` |
| set | ``synset/<set>.pt`` (selmatch, mtt, init_full, random_partial, merge) | + model, distill.* (math), experts.lr, start | experts, scores and window (as the start needs) | ``selmatch distill`` / ``run`` |
| initial set | ``synset/<set>_init.pt`` | the same as its set | the same | the same |
| checkpoint | ``checkpoints/<set>.pt`` | its set's, but distill.iterations | the same | the same |
| evaluation | ``eval/<row>.json`` | data, eval.* (training), seed | the row's set, experts | ``selmatch evaluate`` / ``run`` |
| beta trials | ``tune/beta/trials.jsonl`` | data, select.ipc, seed, eval.*, the split (tune.*) | scores | ``selmatch tune`` |
| alpha trials | ``tune/alpha/trials.jsonl`` | the beta trials' + distill.* (math), model, experts.lr | experts, scores (and the start the β trials chose) | ``selmatch tune`` |
| tuned | ``tune/selected.yaml`` | the grids and starts of both searches | beta trials, alpha trials | ``selmatch tune`` |

With ``tuned: true`` (``--tuned``) the sets that take select.init, select.beta or distill.alpha
from the config also read ``tuned``: a choice made with other settings is refused, not applied.
| report | ``report.md``, ``results.json`` | every field but run_dir (it shows the config) | every evaluation | ``selmatch run`` |

(``docs/pipeline.md`` is generated from :func:`pipeline_markdown`; a test keeps it in step.)

What an artifact is made of is its **stamp** (:func:`made_of`): the values of its config fields,
the digests of the artifacts it reads, what it takes from them (``extra``: the start the window
search decided), its kind, name, role and version. Stored beside the artifact, compared on every
use by distill/freshness.py, the one place that answers "is it fresh, and if not why" and "what
is missing". Fields left out are resources and bookkeeping that do not change a result
(threads, Ray resources, checkpoint interval, eager or compiled: equal results, tested).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from distill.augment import has_real_part
from distill.config import RunConfig, to_dict
from distill.methods import DISTILLED, FIXED, METHODS, augment_for, chosen, distill_config
from distill.selection import needs_scores, needs_search


@dataclass(frozen=True, order=True)
class Ref:
    """One artifact: its ``kind`` (a key of :data:`KINDS`), its ``name`` (a score kind, a row
    or a set; "" for the run's only one) and, for a repetition's artifact, its ``seed``."""

    kind: str
    name: str = ""
    seed: int | None = None

    def __str__(self) -> str:
        text = f"{self.kind} {self.name}".strip()
        return text if self.seed is None else f"{text} (seed {self.seed})"


@dataclass(frozen=True)
class Kind:
    path: str           # under the run directory (per_seed: the repetition's); {name}
    role: str           # what it is, in words
    made_by: str        # the command that makes it
    version: int        # bumped when the code that makes it changes what it means
    per_seed: bool = False


KINDS: dict[str, Kind] = {
    "experts": Kind("experts/manifest.json", "expert trajectories", "selmatch experts", 1),
    "scores": Kind("scores/{name}.npy", "difficulty scores", "selmatch scores", 1),
    "window": Kind("window/results.json", "window search (β and SelMatch's start)",
                   "selmatch window", 2),
    "selection": Kind("synset/{name}.pt", "selection row's set", "selmatch run", 2, True),
    "set": Kind("synset/{name}.pt", "distilled set", "selmatch distill", 2, True),
    "init": Kind("synset/{name}_init.pt", "a distilled set's starting point", "selmatch distill",
                 2, True),
    "checkpoint": Kind("checkpoints/{name}.pt", "distillation checkpoint", "selmatch distill", 2,
                       True),
    "evaluation": Kind("eval/{name}.json", "evaluation of a row", "selmatch evaluate", 2, True),
    "beta_trials": Kind("tune/beta/trials.jsonl", "β trials of selmatch tune", "selmatch tune", 2),
    "alpha_trials": Kind("tune/alpha/trials.jsonl", "α trials of selmatch tune", "selmatch tune",
                         2),
    "tuned": Kind("tune/selected.yaml", "the choice of selmatch tune", "selmatch tune", 1),
    "report": Kind("report.md", "the report", "selmatch run", 1),
}

ORDER = tuple(KINDS)
"""The order stages run in (and missing stages are listed in)."""

# --------------------------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------------------------

_RESOURCES = ("experts.num_cpus", "experts.num_gpus")
_EVAL_RESOURCES = ("eval.num_cpus", "eval.num_gpus", "eval.methods")
_REAL_ROWS = ("eval.flip", "eval.crop_fill")
_BOOKKEEPING = ("distill.checkpoint_every", "distill.log_every", "distill.check_every",
                "distill.num_threads", "distill.compile", "distill.cuda_graphs",
                "distill.groups_per_call", "distill.group_ranks", "distill.max_image_ratio",
                "distill.max_loss_ratio", "distill.max_lr_change")
"""How often to save, log and check, how the same mathematics runs (eager or compiled, CUDA
graphs, groups per call, ranks per BN group: equal results, tested) and when to stop a run that
diverged (a finished result passed the guards). Precision is kept: TF32 changes the numbers."""
_NOT_DATA = ("data.download",)  # whether torchvision may fetch missing files: not which data
_SPLIT = ("tune.val_fraction", "tune.eval_runs", "tune.beta_epoch_fraction")
_START = ("select.init", "select.beta")
_TUNED = ("select.init", "select.beta", "distill.alpha")  # what tune/selected.yaml sets


def expand(cfg: RunConfig, names: tuple[str, ...], drop: tuple[str, ...] = ()) -> list[str]:
    """Dotted field names: a section expands to its fields; ``drop`` is removed."""
    tree = to_dict(cfg)
    out = []
    for name in names:
        node = tree
        for part in name.split("."):
            node = node[part]
        out += [f"{name}.{k}" for k in node] if isinstance(node, dict) and name in tree else [name]
    return [f for f in dict.fromkeys(out) if f not in drop and f not in _NOT_DATA]


def eval_network_fields(cfg: RunConfig) -> tuple[str, ...]:
    """The model.* fields an evaluation network takes (distill.methods.eval_network): the
    distillation network's width, depth and norm where eval.* leaves them null and eval.model is
    that network."""
    if cfg.eval.model != cfg.model.name:
        return ("model.name",)
    return ("model.name",) + tuple(f"model.{k}" for k in ("width", "depth", "norm")
                                   if getattr(cfg.eval, k) is None)


def training_fields(cfg: RunConfig, augment: str, *, runs: bool = False) -> tuple[str, ...]:
    """What training evaluation networks with ``augment`` is made of: eval.* but the
    resources and the rows to compute (and how real rows are cropped and flipped, where
    ``augment`` has no such part; the run count only with ``runs``: the searches train
    tune.eval_runs networks instead), plus the model fields of :func:`eval_network_fields`."""
    drop = _EVAL_RESOURCES + (() if runs else ("eval.runs",)) + \
        (() if has_real_part(augment) else _REAL_ROWS)
    return tuple(expand(cfg, ("eval",), drop)) + eval_network_fields(cfg)


def _row_config(cfg: RunConfig, ref: Ref) -> RunConfig:
    return distill_config(cfg, ref.name) if ref.kind in ("set", "init", "checkpoint") else cfg


def start_of(cfg: RunConfig, row: str) -> tuple[str, float | None]:
    """(select.init, select.beta) of a row's start, before the window search resolves it: the
    config's for SelMatch's rows, the row's own where it fixes it."""
    if row in DISTILLED:
        c = distill_config(cfg, row)
        return c.select.init, c.select.beta
    init = METHODS[row].init
    if init == "start":
        return cfg.select.init, cfg.select.beta
    return init, None


def fields(cfg: RunConfig, ref: Ref) -> list[str]:
    """The config fields ``ref`` is made of (directly; what it reads adds its own)."""
    k = ref.kind
    if k == "experts":
        return expand(cfg, ("data", "model", "experts", "seed"), _RESOURCES)
    if k == "scores":
        if ref.name == cfg.scores.kind:
            return [*expand(cfg, ("data",)), "scores.kind", "scores.file", "scores.key"]
        return [*expand(cfg, ("data",)), "scores.topk", "scores.topk_file", "scores.key"]
    if k in ("window", "beta_trials"):
        grid = ("tune.beta_step", "tune.beta_start") if k == "window" else ()
        return [*expand(cfg, ("data", "select.ipc", "seed", *_SPLIT, *grid)),
                *training_fields(cfg, augment_for("window", cfg))]
    if k == "alpha_trials":
        iters = ("tune.alpha_iterations",) if cfg.tune.alpha_iterations is not None else \
            ("tune.alpha_iterations", "tune.alpha_fraction", "distill.iterations")
        return [*fields(cfg, Ref("beta_trials")), "tune.alpha_epoch_fraction", *iters,
                *expand(cfg, ("model", "distill", "experts.lr"),
                        _BOOKKEEPING + ("distill.alpha", "distill.iterations", "distill.mode")),
                *training_fields(cfg, augment_for("selmatch", cfg))]
    if k == "tuned":
        return expand(cfg, ("tune.beta_step", "tune.beta_bound", "tune.beta_start",
                            "tune.alpha_step", "tune.alpha_bound", "tune.alpha_start"))
    if k == "report":  # it shows the config: all of it but where the run lives
        return expand(cfg, tuple(to_dict(cfg)), ("run_dir",))
    if k == "selection":
        own = ("data", "select.ipc", "seed")
        return expand(cfg, own + (_START + ("tuned",) if METHODS[ref.name].init == "start"
                                  else ()))
    if k in ("set", "init", "checkpoint"):
        drop = _BOOKKEEPING + tuple(FIXED[ref.name]) + \
            (("distill.iterations",) if k == "checkpoint" else ())
        takes_tuned = set(_TUNED) - set(FIXED[ref.name])  # whether tuned: true reads tune's
        return expand(cfg, ("data", "model", "select.ipc", *_START, "distill", "experts.lr",
                            "seed", *(("tuned",) if takes_tuned else ())), drop)
    if k == "evaluation":
        return expand(cfg, ("data", "seed")) + \
            list(training_fields(cfg, augment_for(ref.name, cfg), runs=True))
    raise ValueError(f"unknown artifact kind {k!r}; valid: {', '.join(KINDS)}")


# --------------------------------------------------------------------------------------------
# What each artifact reads
# --------------------------------------------------------------------------------------------


def scores_reads(cfg: RunConfig, name: str) -> list[Ref]:
    file = cfg.scores.file if name == cfg.scores.kind else cfg.scores.topk_file
    return [] if file else [Ref("experts")]


def start_reads(cfg: RunConfig, init: str, beta: float | None, alpha: float) -> list[Ref]:
    """What a start of (init, beta) reads: the window search when it decides it, the scores
    when the selection (or the partial update's split) orders by difficulty."""
    out = [Ref("window")] if needs_search(init, beta) else []
    if init == "topk":
        return out + [Ref("scores", cfg.scores.topk)]
    if needs_scores(init, alpha) or needs_search(init, beta):  # a searched start may be random
        out.append(Ref("scores", cfg.scores.kind))
    return out


def reads(cfg: RunConfig, ref: Ref) -> list[Ref]:
    """The artifacts ``ref`` is made from (their digests are part of its stamp)."""
    k, seed = ref.kind, ref.seed
    if k == "experts":
        return []
    if k == "scores":
        return scores_reads(cfg, ref.name)
    if k in ("window", "beta_trials"):
        return [Ref("scores", cfg.scores.kind)]
    if k == "alpha_trials":  # and the start the β trials chose (its extra)
        return [Ref("experts"), Ref("scores", cfg.scores.kind)]
    if k == "tuned":
        return [Ref("beta_trials"), Ref("alpha_trials")]
    if k == "selection":
        init, beta = start_of(cfg, ref.name)
        if ref.name == "window":
            return [Ref("window"), Ref("scores", cfg.scores.kind)]
        tuned = [Ref("tuned")] if cfg.tuned and METHODS[ref.name].init == "start" else []
        return tuned + start_reads(cfg, init, beta, 0.0)
    if k in ("set", "init", "checkpoint"):
        c = distill_config(cfg, ref.name)
        tuned = [Ref("tuned")] if cfg.tuned and set(_TUNED) - set(FIXED[ref.name]) else []
        return [Ref("experts"), *tuned,
                *start_reads(c, c.select.init, c.select.beta, c.distill.alpha)]
    if k == "evaluation":
        return [set_of(ref.name, seed), Ref("experts")]
    if k == "report":
        return [Ref("evaluation", row, s) for s in (cfg.seeds or [cfg.seed]) for row in
                chosen(cfg)]
    raise ValueError(f"unknown artifact kind {k!r}; valid: {', '.join(KINDS)}")


def set_of(row: str, seed: int | None) -> Ref:
    """The artifact a report row evaluates."""
    synset = METHODS[row].synset
    return Ref("set" if synset in DISTILLED else "selection", synset, seed)


# --------------------------------------------------------------------------------------------
# Stamps
# --------------------------------------------------------------------------------------------


def field_values(cfg: RunConfig, names: list[str]) -> dict:
    tree = to_dict(cfg)
    out = {}
    for name in names:
        node = tree
        for part in name.split("."):
            node = node[part]
        out[name] = node
    return out


def digest(obj) -> str:
    """Short stable hash of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def expert_settings(cfg: RunConfig) -> str:
    """The stamp of one expert: everything that changes its numbers (the experts artifact's
    fields but how many experts: the store grows without retraining), stored as the manifest's
    ``config_hash``."""
    names = [f for f in fields(cfg, Ref("experts")) if f != "experts.num_experts"]
    return digest({"version": KINDS["experts"].version, "fields": field_values(cfg, names)})


def made_of(cfg: RunConfig, ref: Ref, *, inputs: dict[str, str],
            extra: dict | None = None) -> dict:
    """What makes ``ref`` (``cfg``: its repetition's config): kind, name, role and version, its
    config fields' values, the digests of what it reads (``inputs``, keyed by :class:`Ref`
    text) and what it took from them (``extra``)."""
    kind = KINDS[ref.kind]
    values = field_values(_row_config(cfg, ref), fields(cfg, ref))
    return {"artifact": ref.kind, "name": ref.name, "role": kind.role, "version": kind.version,
            "fields": values, "inputs": dict(sorted(inputs.items())), "extra": dict(extra or {})}


def closure(cfg: RunConfig, ref: Ref) -> set[str]:
    """Every config field ``ref`` is made of, through what it reads too."""
    out = set(fields(cfg, ref))
    for up in reads(cfg, ref):
        out |= closure(cfg, up)
    return out


def refs_of(cfg: RunConfig, rows: list[str] | None = None) -> list[Ref]:
    """Every artifact ``selmatch run`` makes for ``cfg`` (``rows``: default the chosen ones),
    upstream first."""
    rows = chosen(cfg) if rows is None else rows
    seeds = cfg.seeds or [cfg.seed]
    out: list[Ref] = []

    def add(ref: Ref) -> None:
        for up in reads(cfg, ref):
            add(up)
        if ref not in out:
            out.append(ref)

    for seed in seeds:
        for row in rows:
            add(Ref("evaluation", row, seed))
    add(Ref("report"))
    return out


def _fields_text(cfg: RunConfig, names: list[str]) -> str:
    """Dotted fields grouped by section: ``data.*``, ``eval.* but runs, methods``, ``seed``."""
    tree, left, parts = to_dict(cfg), list(dict.fromkeys(names)), []
    for section, value in tree.items():
        if not isinstance(value, dict):
            if section in left:
                parts.append(section)
            continue
        have = [k for k in value if f"{section}.{k}" in left]
        if not have:
            continue
        if len(have) == len(value):
            parts.append(f"{section}.*")
        elif len(have) > len(value) // 2:
            parts.append(f"{section}.* but {', '.join(k for k in value if k not in have)}")
        else:
            parts.append(", ".join(f"{section}.{k}" for k in have))
    return "; ".join(parts)


def pipeline_markdown(cfg: RunConfig | None = None) -> str:
    """The stage table as docs/pipeline.md shows it, for ``cfg`` (default: the defaults, where
    SelMatch's start is the window search's and every paper row is computed). A test keeps the
    page and this in step; ``python -m distill.artifacts`` prints it."""
    cfg = cfg or RunConfig()
    lines = ["| artifact | path | what it is | made of (config fields) | reads | made by | "
             "version |", "| --- | --- | --- | --- | --- | --- | --- |"]
    shown = {}
    for ref in [*refs_of(cfg), Ref("beta_trials"), Ref("alpha_trials"), Ref("tuned")]:
        key = (ref.kind, ref.name)
        if key in shown:
            continue
        shown[key] = ref
        kind = KINDS[ref.kind]
        ups = ", ".join(dict.fromkeys(f"{u.kind} {u.name}".strip() for u in reads(cfg, ref)))
        path = kind.path.format(name=ref.name) + (" (each seed)" if kind.per_seed else "")
        lines.append(f"| {ref.kind} {ref.name}".rstrip() + f" | `{path}` | {kind.role} | "
                     f"{_fields_text(cfg, fields(cfg, ref))} | {ups or '–'} | "
                     f"`{kind.made_by}` | {kind.version} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(pipeline_markdown(), end="")
