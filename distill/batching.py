"""The matching step's batch |b| and batch-norm group g: one rule, one place.

Config validation (distill/validation.py), the Distiller and the estimate (distill/estimate.py)
all resolve them here, from the ``distill`` section and the number of images a step matches
(the whole synthetic set; in merge mode D_distill alone, floor(α·IPC) per class):

* |b| = ``distill.batch_syn``, or every matched image when it is None, and never more than the
  images matched (merge mode matches fewer images than the set holds);
* g = ``distill.bn_group``, or |b|;
* g divides |b| (a step is |b|/g whole groups) and ``distill.group_ranks`` divides g (each
  rank of a group's team holds an equal share of its rows).
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.checks import team_problems
from distill.config import ConfigError, DistillConfig, RunConfig
from distill.selection import split_counts


@dataclass(frozen=True)
class Batching:
    """|b| and g of every step of a distillation, and the settings they came from."""

    matched: int        # images each step draws from
    batch: int          # |b|
    group: int          # g
    group_ranks: int    # ranks sharing every group
    batch_syn: int | None
    bn_group: int | None

    @property
    def groups(self) -> int:
        """BN groups per step."""
        return self.batch // self.group

    def problems(self) -> list[str]:
        """What is wrong with these settings (nothing to check when no image is matched)."""
        if self.matched < 1 or self.batch < 1 or self.group < 1:
            return []
        out = []
        if self.batch % self.group:
            out.append(f"distill.bn_group ({self.group}) must divide the batch |b| = {self.batch} "
                       f"({self._batch_source()})")
        if self.group_ranks >= 1:
            out += team_problems(self.group_ranks, group=self.group)
        return out

    def check(self) -> Batching:
        """Raise one ConfigError listing :meth:`problems`; returns itself otherwise."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    def _batch_source(self) -> str:
        if self.batch_syn is None:
            return f"distill.batch_syn null: every one of the {self.matched} images matched"
        if self.batch_syn > self.matched:
            return (f"distill.batch_syn {self.batch_syn}, capped at the {self.matched} images "
                    f"matched")
        return "distill.batch_syn"


def idle_ranks(batch: int, group: int, group_ranks: int, ranks: int) -> str | None:
    """Why some of ``ranks`` ranks would idle (a step has fewer BN groups than teams of
    ``group_ranks``), and what to change; None when every rank has work."""
    teams, groups = ranks // group_ranks, batch // group
    if groups >= teams:
        return None
    return (f"{(teams - groups) * group_ranks} of {ranks} ranks idle: |b|/g = {groups} group(s) "
            f"per step for {teams} team(s) of {group_ranks}; set distill.bn_group <= "
            f"{batch // teams}, or distill.group_ranks to spread each group over more ranks (g "
            f"is part of the math: changing it changes the result; neither R nor group_ranks "
            f"does)")


def resolve(d: DistillConfig, matched: int) -> Batching:
    """|b| and g of a step drawing from ``matched`` images."""
    batch = min(d.batch_syn or matched, matched)
    return Batching(matched=matched, batch=batch, group=d.bn_group or batch,
                    group_ranks=d.group_ranks, batch_syn=d.batch_syn, bn_group=d.bn_group)


def matched_images(cfg: RunConfig, num_classes: int) -> int:
    """Images a step of ``cfg``'s distillation draws from: the set, or D_distill in merge mode."""
    if cfg.distill.mode == "merge":
        return split_counts(cfg.select.ipc, cfg.distill.alpha)[1] * num_classes
    return cfg.select.ipc * num_classes


def resolve_config(cfg: RunConfig, num_classes: int) -> Batching:
    """:func:`resolve` for the images ``cfg`` matches (before anything is loaded)."""
    return resolve(cfg.distill, matched_images(cfg, num_classes))
