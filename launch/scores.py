"""``selmatch scores``: write ``<run_dir>/scores/<kind>.npy`` for ``scores.kind``.

    selmatch scores --config configs/quickstart.yaml                  # forgetting, from the experts
    selmatch scores --config configs/quickstart.yaml --scores.kind el2n
    selmatch scores --config configs/cifar10_ipc250.yaml              # imports configs/scores/*.npz

Scores computed from experts need ``selmatch experts`` first; imported scores are checked against
the dataset (length, labels where the file has them, finite values). Each ``<kind>.json`` records
the freshness stamp (distill/freshness.py) of what made it: the data and score settings and the
experts' files or the imported file's sha256.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from distill import storage
from distill.config import RunConfig
from distill.config_io import load_config, save_config
from distill.data import load_configured
from distill.freshness import is_fresh, stamp
from distill.lock import run_dir_lock
from distill.prerequisites import require_stages
from distill.scores import SCORE_KINDS, Scores, compute_scores, save_scores, scores_problem
from distill.trajectories import ExpertStore

log = logging.getLogger(__name__)


def scores_stamp(cfg: RunConfig) -> str:
    if cfg.scores.file:
        if not storage.exists(cfg.scores.file):
            raise FileNotFoundError(f"scores.file {cfg.scores.file} does not exist")
        inputs = {"file": storage.sha256(cfg.scores.file)[:16]}
    else:
        inputs = {"experts": ExpertStore(cfg).digest()}
    return stamp(cfg, "scores", inputs=inputs)


def run_scores(cfg: RunConfig, *, write_config: bool = True) -> Scores:
    storage.check_writable(cfg.run_dir)
    with run_dir_lock(cfg.run_dir, "selmatch scores"):
        return _run_scores(cfg, write_config)


def _run_scores(cfg: RunConfig, write_config: bool) -> Scores:
    ds = load_configured(cfg.data)
    scores = compute_scores(cfg, ds)
    want = scores_stamp(cfg)
    if write_config:
        save_config(cfg)
    url = save_scores(cfg.run_dir, scores, extra={"stamp": want})
    v = scores.values
    log.info("%s scores (%s, hard end: %s) -> %s: min %.4g, median %.4g, max %.4g, %d distinct",
             scores.kind, scores.source, scores.hard_end, url, v.min(), np.median(v), v.max(),
             len(np.unique(v)))
    return scores


def ensure_scores(cfg: RunConfig) -> bool:
    """``scores/<kind>.npy`` for ``cfg.scores``, recomputed unless fresh; True if it was fresh."""
    meta_url = storage.join(cfg.run_dir, "scores", f"{cfg.scores.kind}.json")
    problem = scores_problem(cfg.run_dir, cfg.scores.kind)
    if problem is None and is_fresh(storage.read_json(meta_url).get("stamp"), scores_stamp(cfg)):
        log.info("scores: %s present and fresh, skipped", cfg.scores.kind)
        return True
    if problem not in (None, "missing"):
        log.warning("%s: computing them again", problem)
    run_scores(cfg, write_config=False)
    return False


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


def cmd_scores(args, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides)
    require_stages(cfg, "scores")
    run_scores(cfg)
    return 0
