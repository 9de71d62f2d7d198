"""``selmatch scores``: write ``<run_dir>/scores/<kind>.npy`` for ``scores.kind``.

    selmatch scores --config configs/quickstart.yaml                  # forgetting, from the experts
    selmatch scores --config configs/quickstart.yaml --scores.kind el2n
    selmatch scores --config configs/cifar10_ipc250.yaml              # imports configs/scores/*.npz

Scores computed from experts need fresh experts (``selmatch experts``; grown or retrained
experts make them stale); imported scores are checked against the dataset (length, labels where
the file has them, finite values). Each ``<kind>.json`` records the stamp of what made it
(distill/artifacts.py): the data and score settings and the experts' files or the imported
file's sha256.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from distill import storage
from distill.artifacts import Ref, digest
from distill.config import RunConfig
from distill.config_io import load_config, save_config
from distill.data import load_configured
from distill.freshness import Freshness
from distill.lock import check_not_busy, run_dir_lock
from distill.scores import SCORE_KINDS, Scores, compute_scores, save_scores
from distill.trajectories import ExpertStore

log = logging.getLogger(__name__)


def topk_config(cfg: RunConfig) -> RunConfig:
    """The config whose ``scores`` section yields the top-k row's scores (``scores.topk``): the
    run's own scores when the kind is the same, else ``scores.topk_file``, else the experts."""
    sc = cfg.scores
    if sc.topk == sc.kind:
        return cfg
    if sc.topk_file is None and SCORE_KINDS[sc.topk].from_experts is None:
        raise ValueError(f"scores.topk {sc.topk} cannot be computed from experts; set "
                         f"scores.topk_file")
    return dataclasses.replace(cfg, scores=dataclasses.replace(sc, kind=sc.topk,
                                                               file=sc.topk_file))


def make_scores(check: Freshness, name: str) -> Scores:
    """Compute (or import) scores ``name`` of ``check``'s run and write them with their stamp."""
    cfg = check.cfg if name == check.cfg.scores.kind else topk_config(check.cfg)
    ref = Ref("scores", name)
    ds = check.ds if check.ds is not None else load_configured(cfg.data)
    experts = None if cfg.scores.file else ExpertStore(cfg).load_all()
    scores = compute_scores(cfg, ds, experts)
    made = check.wanted(ref)
    url = save_scores(cfg.run_dir, scores, extra={"stamp": digest(made), "made_of": made})
    check.forget()
    v = scores.values
    log.info("%s scores (%s, hard end: %s) -> %s: min %.4g, median %.4g, max %.4g, %d distinct",
             scores.kind, scores.source, scores.hard_end, url, v.min(), np.median(v), v.max(),
             len(np.unique(v)))
    return scores


def ensure_scores(check: Freshness, name: str) -> bool:
    """Scores ``name`` of ``check``'s run, made unless fresh; True if they were fresh."""
    status = check.status(Ref("scores", name))
    if status.fresh:
        log.info("scores: %s present and fresh, skipped", name)
        return True
    if not status.missing:
        log.warning("scores %s: %s; computing them again", name, status.why)
    make_scores(check, name)
    return False


def run_scores(cfg: RunConfig):
    """``selmatch scores``: the configured difficulty scores computed (or imported) and
    written, under the run directory's lock (the experts must be present and fresh); returns
    them."""
    check_not_busy(cfg.run_dir)
    check = Freshness(cfg)
    check.require("scores")
    storage.check_writable(cfg.run_dir)
    with run_dir_lock(cfg.run_dir, "selmatch scores"):
        save_config(cfg)
        return make_scores(check, cfg.scores.kind)


def cmd_scores(args, overrides: list[str]) -> int:
    run_scores(load_config(args.config, overrides))
    return 0
