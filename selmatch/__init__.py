"""selmatch's Python API: the pipeline and its results as functions and tensors.

    import selmatch

    cfg = selmatch.load_config("configs/quickstart.yaml", {"run_dir": "runs/mine"})
    report = selmatch.run(cfg)                          # every stage that is not fresh
    s = selmatch.load_set(cfg.run_dir, "selmatch")      # tensors, normalised and in pixels
    result = selmatch.evaluate(cfg, s.images, s.labels, is_distilled=s.is_distilled)

docs/api.md shows each function with code that a test runs. The command line (``selmatch
run``, ``distill``, ...) and this API share one implementation: each function here is a few
lines over the modules the commands use, and stages are skipped when fresh in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distill.config import RunConfig
from distill.data import Dataset, register_dataset
from distill.evaluate import EvalResult
from distill.models import register_network

__all__ = ["EvalResult", "RunConfig", "SetTensors", "evaluate", "export", "load_config",
           "load_dataset", "load_set", "register_dataset", "register_network", "run",
           "run_stage"]

STAGES = ("experts", "scores", "window", "distill", "evaluate", "tune")
"""What :func:`run_stage` runs (``selmatch run`` runs them all, with the report)."""


def load_config(path: str | None = None,
                overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """A validated config: defaults ← YAML file (path or fsspec URL) ← ``overrides``, dotted
    (``{"distill.alpha": 0.3}`` or ``["--distill.alpha", "0.3"]``)."""
    from distill.config_io import load_config as load

    return load(path, overrides)


def load_dataset(cfg: RunConfig) -> Dataset:
    """``cfg.data`` loaded: train and test tensors in model input space (``denormalize`` maps
    them to pixels), labels and class names."""
    from distill.data import load_configured

    return load_configured(cfg.data)


def run(cfg: RunConfig, *, workers: int = 0) -> str:
    """Every stage of ``selmatch run`` that is not fresh, then the report; returns its URL.
    ``workers``: 0 runs experts and evaluations in this process (what a registered dataset or
    network needs: they exist in this process only), None lets Ray decide."""
    from launch.pipeline import run_pipeline

    return run_pipeline(cfg, workers=workers)


def run_stage(cfg: RunConfig, stage: str, *, workers: int = 0) -> Any:
    """One stage, as its command runs it (inputs that are missing or stale are refused, naming
    the command that makes them): ``experts`` (the manifest), ``scores`` (the Scores),
    ``window`` (the search's results), ``distill`` (the SyntheticSet, the one on storage when it
    is fresh), ``evaluate`` (the URLs of eval/<row>.json), ``tune`` (tune's summary)."""
    if stage == "experts":
        from launch.experts import run_experts

        return run_experts(cfg, workers=workers)
    if stage == "scores":
        from launch.scores import run_scores

        return run_scores(cfg)
    if stage == "window":
        from launch.pipeline import run_window

        return run_window(cfg)
    if stage == "distill":
        from launch.distillation import run_distill

        return run_distill(cfg, progress=False)
    if stage == "evaluate":
        from launch.pipeline import evaluate_present

        return evaluate_present(cfg, workers=workers)
    if stage == "tune":
        from tune.main import run_tune

        return run_tune(cfg, use_ray=workers != 0)
    raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")


@dataclass(frozen=True)
class SetTensors:
    """A synthetic set as tensors: ``images`` in the model input space it was distilled in,
    ``pixels`` = images × std + mean (not clamped: distilled pixels may leave [0, 1]),
    ``labels``, ``is_distilled`` (the rows the partial update learnt), ``source_index`` (the
    training image each row started from, -1 for none), the learnt student ``syn_lr``, the
    normalisation, the class names and the set's metadata (start, α, stamp, ...)."""

    images: torch.Tensor
    pixels: torch.Tensor
    labels: torch.Tensor
    is_distilled: torch.Tensor
    source_index: torch.Tensor
    syn_lr: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    meta: dict


def load_set(run_dir: str, name: str) -> SetTensors:
    """``<run_dir>/synset/<name>.pt`` (verified, loaded without running code) as tensors; a
    repetition seed's set lies in ``<run_dir>/seeds/<s>``."""
    from distill.synset import load_synset

    synset, state = load_synset(run_dir, name)
    meta = state.get("meta", {})
    data = meta.get("data")
    if data is None:
        raise ValueError(f"{run_dir}/synset/{name}.pt records no normalisation (made by an "
                         f"older version): make it again with `selmatch run`")
    images = synset.images().detach()
    mean = torch.tensor(data["mean"]).view(-1, 1, 1)
    std = torch.tensor(data["std"]).view(-1, 1, 1)
    return SetTensors(images=images, pixels=images * std + mean, labels=synset.labels,
                      is_distilled=synset.is_distilled, source_index=synset.source_index,
                      syn_lr=float(synset.syn_lr.detach()), mean=tuple(data["mean"]),
                      std=tuple(data["std"]), class_names=tuple(data["class_names"]), meta=meta)


def evaluate(cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor, *,
             is_distilled: torch.Tensor | None = None, augment: str | None = None,
             seed: int | None = None, reference: bool = True) -> EvalResult:
    """Train ``cfg.eval.runs`` networks on (images, labels) by exactly the report's protocol
    and test them on ``cfg``'s test split. ``images`` in model input space (a set's
    ``images``). ``augment``: default the report's rule for a set like this one (``eval.augment``
    if set; else combined when it has both real and distilled rows, DSA otherwise).
    ``reference``: also the easy/hard halves and coverage, from the run's first expert (when
    ``cfg.run_dir`` has experts)."""
    from distill import storage
    from distill.evaluate import evaluate_images
    from distill.freshness import Freshness
    from launch.stages import ReferenceCache

    ds = load_dataset(cfg)
    if augment is None:
        both = is_distilled is not None and bool(is_distilled.any()) and \
            bool((~is_distilled.bool()).any())
        augment = cfg.eval.augment or ("combined" if both else "dsa")
    ref = None
    if reference and storage.exists(storage.join(cfg.run_dir, "experts", "manifest.json")):
        ref = ReferenceCache(Freshness(cfg, ds), ds).get()
    return evaluate_images(cfg, ds, images, labels, is_distilled=is_distilled,
                           augment=augment, reference=ref, seed=seed, progress=False)


def export(cfg: RunConfig, row: str, out: str, *, seed: int | None = None,
           test: bool = True) -> dict:
    """``selmatch export``: row ``row``'s set as class folders of PNGs (and the test split as
    ``val/``), ``labels.csv``, ``metadata.json`` and ``tensors.pt``; returns the metadata."""
    from launch.export import export_set

    return export_set(cfg, row, out, seed=seed, test=test)
