"""``selmatch scores``: write ``<run_dir>/scores/<kind>.npy`` for ``scores.kind``.

    selmatch scores --config configs/quickstart.yaml                  # forgetting, from the experts
    selmatch scores --config configs/quickstart.yaml --scores.kind el2n
    selmatch scores --config configs/cifar10_ipc250.yaml              # imports configs/scores/*.npz

Scores computed from experts need ``selmatch experts`` first; imported scores are checked against
the dataset (length, and labels where the file has them).
"""

from __future__ import annotations

import logging

import numpy as np

from distill.config import RunConfig, save_config
from distill.data import load_configured
from distill.scores import Scores, compute_scores, save_scores

log = logging.getLogger(__name__)


def run_scores(cfg: RunConfig) -> Scores:
    ds = load_configured(cfg.data)
    scores = compute_scores(cfg, ds)
    save_config(cfg)
    url = save_scores(cfg.run_dir, scores)
    v = scores.values
    log.info("%s scores (%s, hard end: %s) -> %s: min %.4g, median %.4g, max %.4g, %d distinct",
             scores.kind, scores.source, scores.hard_end, url, v.min(), np.median(v), v.max(),
             len(np.unique(v)))
    return scores


def cmd_scores(args, overrides: list[str]) -> int:
    from launch.cli import resolve_config

    run_scores(resolve_config(args, overrides))
    return 0
