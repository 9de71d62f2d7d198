"""The tiny digits problem shared by the distillation, distributed, pipeline and tune tests.

30 images per class, a depth-1 ConvNet of width 8, 2 experts of 3 epochs, IPC 4: every stage of
the pipeline runs in seconds on 2 CPU cores and still does real work.
"""

from __future__ import annotations

from distill.config import RunConfig
from distill.config_io import from_dict
from distill.freshness import Freshness
from launch.scores import make_scores
from launch.experts import run_experts

BASE = {
    "data": {"name": "digits", "train_per_class": 30},
    "model": {"name": "convnet", "width": 8, "depth": 1},
    "experts": {"num_experts": 2, "epochs": 3, "batch_size": 32, "lr": 0.05, "el2n_epoch": 1},
    "select": {"ipc": 4, "beta": 0.2, "init": "window"},
    "distill": {"alpha": 0.5, "iterations": 4, "syn_steps": 3, "expert_epochs": 1,
                "max_start_epoch": 2, "batch_syn": 8, "lr_images": 100.0,
                "checkpoint_every": 2, "log_every": 1},
}


def tiny_config(run_dir, *, seed: int = 5, **sections: dict) -> RunConfig:
    """BASE with each given section's fields replaced (a shallow merge per section)."""
    data = {"run_dir": str(run_dir), "seed": seed}
    for key in BASE.keys() | sections.keys():
        data[key] = {**BASE.get(key, {}), **sections.get(key, {})}
    return from_dict(data)


def prepare(cfg: RunConfig) -> RunConfig:
    """Train the experts in-process and write the forgetting scores into ``cfg.run_dir``."""
    run_experts(cfg, workers=0, progress=False)
    make_scores(Freshness(cfg), cfg.scores.kind)
    return cfg


def distill_killed_at(cfg: RunConfig, iteration: int) -> None:
    """``run_distill(cfg)`` killed (KeyboardInterrupt) as it starts ``iteration`` (counted from
    0, so the steps logged before are 1..iteration); checks that the kill did happen."""
    import pytest

    from launch.distillation import run_distill
    from helpers import killed_at

    with killed_at(iteration), pytest.raises(KeyboardInterrupt):
        run_distill(cfg, progress=False)


def config_file(cfg: RunConfig, path) -> str:
    """``cfg`` written as YAML at ``path`` (a pathlib.Path); its path as a string."""
    from distill.config_io import dump_yaml

    path.write_text(dump_yaml(cfg))
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``selmatch *argv`` in this process: (exit status, what it printed on stderr)."""
    from launch.cli import main

    rc = main(list(argv))
    return rc, capsys.readouterr().err
