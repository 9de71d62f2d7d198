"""Difficulty scores: one value per training sample, in dataset order, with a known hard end.

A score carries its direction (``hard_end``: "high" or "low") so the selection code never has to
guess whether a large value means easy (C-score) or hard (forgetting, EL2N).

Sources (a registry; an unknown kind lists the valid ones):

* ``forgetting``: mean over experts of forgetting events (never-learned samples count E);
* ``el2n``: mean over experts of the EL2N norm after ``experts.el2n_epoch``;
* ``cscore``: consistency scores, imported from a file (they need thousands of trained models);
* any kind can be imported from a ``.npy`` / ``.npz`` file or fsspec URL via ``scores.file``.

Written as ``<run_dir>/scores/<kind>.npy`` plus ``<kind>.json`` (direction, source, hashes).
"""

from __future__ import annotations

import io as _io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from distill import integrity, storage
from distill.config import RunConfig
from distill.data import Dataset, DatasetNotFoundError, get_info
from distill.experts import ExpertResult, forgetting_counts


@dataclass(frozen=True)
class Scores:
    kind: str
    values: np.ndarray      # float64 [N_train], dataset order
    hard_end: str           # "high" or "low"
    source: str             # "experts:<n>" or the imported file

    def hardness(self) -> np.ndarray:
        """Values oriented so that larger = harder (for sorting and plots)."""
        return self.values if self.hard_end == "high" else -self.values


def _from_forgetting(experts: Sequence[ExpertResult]) -> np.ndarray:
    return torch.stack([forgetting_counts(e.correct) for e in experts]).double().mean(0).numpy()


def _from_el2n(experts: Sequence[ExpertResult]) -> np.ndarray:
    return torch.stack([e.el2n for e in experts]).double().mean(0).numpy()


@dataclass(frozen=True)
class ScoreKind:
    hard_end: str
    from_experts: Callable[[Sequence[ExpertResult]], np.ndarray] | None
    description: str


SCORE_KINDS: dict[str, ScoreKind] = {
    "forgetting": ScoreKind("high", _from_forgetting,
                            "forgetting events, mean over experts (never learned = E)"),
    "el2n": ScoreKind("high", _from_el2n, "EL2N at an early epoch, mean over experts"),
    "cscore": ScoreKind("low", None, "C-score (Jiang et al. 2021), imported from a file"),
}


def score_kind(kind: str) -> ScoreKind:
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}; valid kinds: {', '.join(SCORE_KINDS)}")
    return SCORE_KINDS[kind]


def from_experts(kind: str, experts: Sequence[ExpertResult]) -> Scores:
    spec = score_kind(kind)
    if spec.from_experts is None:
        raise ValueError(f"{kind} scores cannot be computed from experts; set scores.file to a "
                         f"file holding them (e.g. configs/scores/cscores_CIFAR10.npz)")
    if not experts:
        raise ValueError("no experts to compute scores from; run `selmatch experts` first")
    return Scores(kind, spec.from_experts(experts), spec.hard_end, f"experts:{len(experts)}")


def import_scores(url: str, kind: str, ds: Dataset, *, key: str = "scores") -> Scores:
    """Read scores from a .npy or .npz file (path or fsspec URL) and check them against ``ds``.

    The length must equal the training-set size; if the file carries ``labels`` they must equal
    the dataset's labels (catches a file made for another dataset or another sample order).
    """
    spec = score_kind(kind)
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"scores.file {url} does not exist") from err
    loaded = _np_load(raw, url, "scores.file")
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        if key not in loaded.files:
            raise ValueError(f"{url} has no array {key!r} (scores.key); arrays: {', '.join(loaded.files)}")
        values = loaded[key]
        labels = loaded["labels"] if "labels" in loaded.files else None
    else:
        values = loaded
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"scores.file {url} holds {values.dtype} values, not numbers: a score "
                         f"file holds one number per training sample")
    values = values.astype(np.float64).reshape(-1)
    n = len(ds.y_train)
    try:
        full = get_info(ds.info.name).train_size
    except DatasetNotFoundError:  # imagefolder: its facts need its root; the loaded set is all
        full = None
    if len(values) == full and n != full and ds.train_index is not None:
        # Scores for the full training set, data.train_per_class subset loaded: pick its rows.
        keep = ds.train_index.numpy()
        values = values[keep]
        labels = None if labels is None else np.asarray(labels).reshape(-1)[keep]
    elif len(values) != n:
        expected = f"{n}" if n == full or full is None else f"{n} (or {full} for the full set)"
        raise ValueError(f"{url} holds {len(values)} scores but {ds.info.name} has {expected} "
                         f"training samples")
    if labels is not None and not np.array_equal(np.asarray(labels).reshape(-1), ds.y_train.numpy()):
        bad = int((np.asarray(labels).reshape(-1) != ds.y_train.numpy()).sum())
        raise ValueError(f"{url}: its labels differ from {ds.info.name}'s training labels at {bad} "
                         f"positions (scores for another dataset or another sample order)")
    _check_finite(values, url)
    return Scores(kind, values, spec.hard_end, url)


def _np_load(raw: bytes, url: str, what: str):
    """np.load with an error that names the file (random bytes raise several types)."""
    try:
        return np.load(_io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{what} {url} is not a readable .npy/.npz array file "
                         f"({type(err).__name__}: {err})") from err


def _check_finite(values: np.ndarray, url: str) -> None:
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{url} holds {values.dtype} values, not numbers")
    bad = ~np.isfinite(values.astype(np.float64, copy=False))
    if bad.any():
        first = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(f"{url} contains {int(bad.sum())} NaN or infinite score(s) (first at "
                         f"sample index {first}); every training sample needs a finite score")


def _urls(run_dir: str, kind: str) -> tuple[str, str]:
    base = storage.join(run_dir, "scores")
    return storage.join(base, f"{kind}.npy"), storage.join(base, f"{kind}.json")


FIX = "run `selmatch scores --config F` to compute them again"


def save_scores(run_dir: str, scores: Scores, *, extra: dict | None = None) -> str:
    """Write ``scores/<kind>.npy`` then its ``.json`` manifest (which marks it complete), each
    with its checksum (distill/integrity.py)."""
    npy_url, meta_url = _urls(run_dir, scores.kind)
    buf = _io.BytesIO()
    np.save(buf, scores.values)
    integrity.write_bytes(npy_url, buf.getvalue())
    meta = {"kind": scores.kind, "hard_end": scores.hard_end, "source": scores.source,
            "n": int(len(scores.values)), **(extra or {})}
    integrity.write_json(meta_url, meta)
    return npy_url


def scores_problem(run_dir: str, kind: str) -> str | None:
    """None when ``scores/<kind>.npy`` and its manifest are present and intact; 'missing' when
    they were never written; else what is damaged."""
    npy_url, meta_url = _urls(run_dir, kind)
    if not storage.exists(meta_url):
        return "missing"
    for url in (npy_url, meta_url):
        bad = integrity.problem(url)
        if bad is not None:
            return f"{url} is damaged ({bad})" if bad != "missing" else f"{url} is missing"
    return None


def load_scores(run_dir: str, kind: str) -> Scores:
    npy_url, meta_url = _urls(run_dir, kind)
    if not storage.exists(meta_url):
        raise FileNotFoundError(f"no {kind} scores in {storage.join(run_dir, 'scores')}; create them "
                                f"with `selmatch scores --config F`")
    meta = integrity.read_json(meta_url, fix=FIX)
    if not storage.exists(npy_url):
        raise FileNotFoundError(f"{npy_url} is missing (its manifest {meta_url} exists); re-create "
                                f"it with `selmatch scores --config F`")
    values = _np_load(integrity.read_bytes(npy_url, fix=FIX), npy_url, "scores")
    if not isinstance(values, np.ndarray) or values.ndim != 1:
        raise ValueError(f"{npy_url} must hold one array of shape [n], got "
                         f"{getattr(values, 'shape', type(values).__name__)}")
    if len(values) != meta.get("n") or meta.get("hard_end") not in ("high", "low"):
        raise integrity.DamagedArtifactError(
            meta_url, f"{len(values)} values in {npy_url}, the manifest says n = "
                      f"{meta.get('n')!r}, hard_end {meta.get('hard_end')!r}", FIX)
    _check_finite(values, npy_url)
    return Scores(kind, values, meta["hard_end"], meta.get("source", "?"))


def scores_exist(run_dir: str, kind: str) -> bool:
    return storage.exists(_urls(run_dir, kind)[1])


def scores_digest(run_dir: str, kind: str) -> str:
    """sha256 of ``scores/<kind>.npy`` (the freshness input of what is selected by it)."""
    npy_url = _urls(run_dir, kind)[0]
    if not storage.exists(npy_url):
        raise FileNotFoundError(f"no {kind} scores in {storage.join(run_dir, 'scores')}; create "
                                f"them with `selmatch scores --config F`")
    return storage.sha256(npy_url)[:16]


def compute_scores(cfg: RunConfig, ds: Dataset,
                   experts: Sequence[ExpertResult] | None = None) -> Scores:
    """Scores for ``cfg.scores``: imported from ``scores.file``, or computed from ``experts``
    (the caller loads and verifies them: distill.trajectories.ExpertStore.load_all)."""
    if cfg.scores.file:
        return import_scores(cfg.scores.file, cfg.scores.kind, ds, key=cfg.scores.key)
    scores = from_experts(cfg.scores.kind, experts or [])
    if len(scores.values) != len(ds.y_train):
        raise ValueError(f"experts have {len(scores.values)} samples, the dataset {len(ds.y_train)}")
    return scores
