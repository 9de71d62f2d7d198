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

plus ``init``: SelMatch's starting set alone (the window at the configured β, α = 0: nothing
distilled; the same images as ``synset/selmatch_init.pt``), which says what distillation added.
``selmatch_dsa`` evaluates the same set as ``selmatch``; only the augmentation differs.

A row's set is made by a selection (cheap, deterministic given the scores and the seed) or by a
distillation (:func:`distill_config` gives its config); ``eval.methods`` names the rows to compute,
and the sets no chosen row needs are never made.
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
    Method("init", "SelMatch init alone (window at β, α = 0)", "init", "dsa", "selection",
           init="window"),
    Method("mtt", "MTT (random init, full update)", "mtt", "dsa", "distill", (False, False, False)),
    Method("init_full", "Select init + full update (α = 1)", "init_full", "dsa", "distill",
           (True, False, False)),
    Method("selmatch_dsa", "Select init + partial update (DSA eval)", "selmatch", "dsa", "distill",
           (True, True, False)),
    Method("selmatch", "SelMatch (combined augmentation)", "selmatch", "combined", "distill",
           (True, True, True)),
    Method("merge", "Merge (ablation: D_distill matched alone)", "merge", "combined", "distill"),
)}

SYNSETS = tuple(dict.fromkeys(m.synset for m in METHODS.values()))
"""Every synthetic set a row evaluates (``synset/<name>.pt``; a distillation's starting point is
``<name>_init``)."""

# how the config of each distilled set differs from the run's: (select fields, distill fields)
_DISTILLED: dict[str, tuple[dict, dict]] = {
    "selmatch": (dict(init="window"), dict(mode="joint")),
    "mtt": (dict(init="random", beta=0.0), dict(alpha=1.0, mode="joint")),
    "init_full": (dict(init="window"), dict(alpha=1.0, mode="joint")),
    "merge": (dict(init="window"), dict(mode="merge")),
}
DISTILLED = tuple(_DISTILLED)
"""The sets made by distillation (the others are selections)."""

PAPER_METHODS = ("random", "topk", "window", "init", "mtt", "init_full", "selmatch_dsa", "selmatch")
"""What ``selmatch run`` computes by default: Table 1's selection baselines and MTT, Table 3's
ablation rows, the init alone, SelMatch."""


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


def crop_fill_for(cfg: RunConfig) -> str:
    return cfg.eval.crop_fill


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


def distill_config(cfg: RunConfig, synset: str) -> RunConfig:
    """The config that distils ``synset`` (selmatch, mtt, init_full or merge) from ``cfg``.

    MTT is random init + α = 1 (β does not matter: set to 0 so that changing β leaves MTT fresh);
    init_full is the window at the configured β + α = 1; merge is SelMatch matched on D_distill
    alone; selmatch is the config itself with a window init and the joint loss."""
    sel, dis = cfg.select, cfg.distill
    if synset not in _DISTILLED:
        raise ValueError(f"{synset!r} is not made by distillation; distilled sets: "
                         f"{', '.join(DISTILLED)}")
    s, d = _DISTILLED[synset]
    return dataclasses.replace(cfg, select=dataclasses.replace(sel, **s),
                               distill=dataclasses.replace(dis, **d))
