"""The report's rows: which synthetic set each evaluates, how it is made, and its augmentation.

The paper compares methods under one rule (§5.1): "we evaluate all methods with ResNet18
architecture and DSA augmentation (combined augmentation for SelMatch)". So every selection and
distillation baseline trains its evaluation networks with DSA, and combined augmentation (DSA on
the distilled rows, crop + flip on the selected real rows) is reserved for SelMatch and the rows
that have both parts. ``eval.augment`` overrides the rule for every row (ablations).

Table 3's ablation (CIFAR-100, IPC 100) is four rows built from the same experts and budget:

| row | select init | partial update | combined augment |
| --- | --- | --- | --- |
| ``mtt`` | | | |
| ``init_full`` | ✓ | | |
| ``selmatch_dsa`` | ✓ | ✓ | |
| ``selmatch`` | ✓ | ✓ | ✓ |

plus ``init``: SelMatch's start alone (α = 0: nothing distilled; the same images as
``synset/selmatch_init.pt``), which says what distillation added, and the random start's twins:
``random_partial`` / ``random_partial_dsa`` (the random subset + the partial update: its harder
part real, its easier part distilled), whose α = 1 twin is MTT and whose α = 0 twin is
``random``. With both, the update's gain is measured on both starts. ``selmatch_dsa`` evaluates
the same set as ``selmatch``; only the augmentation differs.

SelMatch's start is the config's (``select.init``, ``select.beta``: the window search's choice
unless pinned, distill/selection.py ``resolve_start``); rows that fix their start or their
update say so in :data:`FIXED`. A row's set is made by a selection (cheap, deterministic given
the scores and the seed) or by a distillation (:func:`distill_config` gives its config);
``eval.methods`` names the rows to compute, and the sets no chosen row needs are never made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from distill.augment import RealAugment
from distill.config import RunConfig
from distill.data import flip_invariant


@dataclass(frozen=True)
class Method:
    name: str                 # eval/<name>.json, the row's key in results.json
    label: str                # the report's row label ({score} = the score kind used)
    synset: str               # the set it evaluates: synset/<synset>.pt
    augment: str              # the paper's rule for this row: dsa or combined
    made_by: str              # selection or distill
    table3: tuple[bool, bool, bool] | None = None  # (select init, partial update, combined)
    init: str | None = None   # a selection row's select.init (its β: distill/baselines.py)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("random", "Random selection", "random", "dsa", "selection", init="random"),
    Method("topk", "Top-k hardest ({score})", "topk", "dsa", "selection", init="topk"),
    Method("window", "Best window (validation β)", "window", "dsa", "selection", init="window"),
    Method("init", "SelMatch's start alone (α = 0)", "init", "dsa", "selection", init="start"),
    Method("mtt", "MTT (random init, full update)", "mtt", "dsa", "distill", (False, False, False)),
    Method("init_full", "SelMatch's start + full update (α = 1)", "init_full", "dsa", "distill",
           (True, False, False)),
    Method("selmatch_dsa", "SelMatch's start + partial update (DSA eval)", "selmatch", "dsa",
           "distill", (True, True, False)),
    Method("selmatch", "SelMatch (combined augmentation)", "selmatch", "combined", "distill",
           (True, True, True)),
    Method("random_partial", "Random start + partial update (combined augmentation)",
           "random_partial", "combined", "distill"),
    Method("random_partial_dsa", "Random start + partial update (DSA eval)", "random_partial",
           "dsa", "distill"),
    Method("merge", "Merge (ablation: D_distill matched alone)", "merge", "combined", "distill"),
)}

SYNSETS = tuple(dict.fromkeys(m.synset for m in METHODS.values()))
"""Every synthetic set a row evaluates (``synset/<name>.pt``; a distillation's starting point is
``<name>_init``)."""

FIXED: dict[str, dict[str, object]] = {
    "selmatch": {"distill.mode": "joint"},
    "mtt": {"select.init": "random", "select.beta": None, "distill.alpha": 1.0,
            "distill.mode": "joint"},
    "init_full": {"distill.alpha": 1.0, "distill.mode": "joint"},
    "random_partial": {"select.init": "random", "select.beta": None, "distill.mode": "joint"},
    "merge": {"distill.mode": "merge"},
}
"""What each distilled set fixes of the run's config (dotted field → value); everything else is
the run's. A fixed field is not part of what the set is made of: changing it in the config
leaves the set as it is."""
DISTILLED = tuple(FIXED)
"""The sets made by distillation (the others are selections)."""

PAPER_METHODS = ("random", "topk", "window", "init", "mtt", "init_full", "selmatch_dsa",
                 "selmatch", "random_partial")
"""What ``selmatch run`` computes by default: Table 1's selection baselines and MTT, Table 3's
ablation rows, SelMatch's start alone, SelMatch, and the random start + partial update."""


def chosen(cfg: RunConfig) -> list[str]:
    """The rows ``cfg`` asks for (``eval.methods``, default :data:`PAPER_METHODS`), in table order."""
    names = cfg.eval.methods if cfg.eval.methods is not None else PAPER_METHODS
    return [m for m in METHODS if m in names]


def augment_for(name: str, cfg: RunConfig) -> str:
    """The augmentation row ``name`` is evaluated with: ``eval.augment`` if set, else the rule."""
    return cfg.eval.augment or METHODS[name].augment


CROP_FILLS = ("black", "mean")
"""``eval.crop_fill``: what the crop of real rows shifts in."""


def flip_for(cfg: RunConfig) -> bool:
    """Whether the crop + flip of real rows flips: ``eval.flip``, else the dataset's default
    (flip-invariant data only: distill/data.py)."""
    return cfg.eval.flip if cfg.eval.flip is not None else flip_invariant(cfg.data.name)


def real_augment(cfg: RunConfig, info) -> RealAugment:
    """The crop + flip of real rows for ``cfg`` on a dataset with ``info``'s normalisation: the
    flip rule, and a black fill (pixel 0, i.e. -mean/std per channel in model input space) or
    the mean colour (0 there)."""
    fill = None
    if cfg.eval.crop_fill == "black":
        fill = torch.tensor([-m / s for m, s in zip(info.mean, info.std)], dtype=torch.float32)
    return RealAugment(flip=flip_for(cfg), fill=fill)


def eval_network(cfg: RunConfig) -> dict:
    """The evaluation network's ConvNet settings (width, depth, norm): ``eval.*`` where set,
    else the distillation network's when ``eval.model`` is that network, else the defaults
    (width 128, the image size's depth, batch norm: the paper's ResNet-18 uses batch norm)."""
    ev, model = cfg.eval, cfg.model
    same = ev.model == model.name
    return {"width": ev.width if ev.width is not None else (model.width if same else 128),
            "depth": ev.depth if ev.depth is not None else (model.depth if same else None),
            "norm": ev.norm if ev.norm is not None else (model.norm if same else "batch")}


def synsets_needed(cfg: RunConfig) -> list[str]:
    """Synthetic sets the chosen rows evaluate, each once, in table order."""
    out: list[str] = []
    for name in chosen(cfg):
        if METHODS[name].synset not in out:
            out.append(METHODS[name].synset)
    return out


def method_name(cfg: RunConfig) -> str:
    """The distilled set a config describes (``selmatch distill`` makes it): merge in merge
    mode; from a random start, mtt at α = 1 and random_partial below; else selmatch."""
    if cfg.distill.mode == "merge":
        return "merge"
    if cfg.select.init == "random":
        return "mtt" if cfg.distill.alpha >= 1 else "random_partial"
    return "selmatch"


def distill_config(cfg: RunConfig, synset: str) -> RunConfig:
    """The config that distils ``synset`` (one of :data:`DISTILLED`) from ``cfg``: the run's,
    with the fields the set fixes (:data:`FIXED`) set. MTT is random init + α = 1; init_full is
    SelMatch's start + α = 1; random_partial the random start at the run's α; merge is SelMatch
    matched on D_distill alone; selmatch is the config itself with the joint loss."""
    if synset not in FIXED:
        raise ValueError(f"{synset!r} is not made by distillation; distilled sets: "
                         f"{', '.join(DISTILLED)}")
    return with_fields(cfg, FIXED[synset])


def with_fields(cfg: RunConfig, values: dict[str, object]) -> RunConfig:
    """``cfg`` with dotted fields (``section.field``) replaced."""
    sections: dict[str, dict] = {}
    for dotted, value in values.items():
        section, name = dotted.split(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v)
                                       for s, v in sections.items()})