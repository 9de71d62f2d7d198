"""configs/fmnist_cpu.yaml, the recorded Fashion-MNIST comparison (bench/fmnist_cpu.sh), loads,
validates with every override its script passes, and runs end to end through `selmatch run` with
its budgets scaled down by overrides: on the real files when they are installed, otherwise on a
tiny set written in the same IDX format."""

from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pytest

from distill.config import ConfigError
from distill.config_io import load_config
from launch.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fmnist_cpu.yaml")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def test_the_config_is_what_the_record_says():
    cfg = load_config(CONFIG)
    assert cfg.data.name == "fashion_mnist" and cfg.data.train_per_class == 1000
    assert cfg.select.ipc == 50 and len(cfg.seeds) >= 3 and cfg.eval.runs >= 2
    # the overrides bench/fmnist_cpu.sh passes: IPC 100 and the uncapped row
    assert load_config(CONFIG, ["--select.ipc", "100"]).select.ipc == 100
    uncapped = load_config(CONFIG, ["--distill.batch_syn", "null", "--distill.bn_group", "null",
                                    "--distill.syn_steps", "20", "--eval.methods", "[selmatch_dsa, selmatch]"])
    assert uncapped.distill.batch_syn is None and uncapped.distill.bn_group is None
    assert uncapped.distill.syn_steps == 20
    assert uncapped.eval.methods == ["selmatch_dsa", "selmatch"]
    with pytest.raises(ConfigError, match="distill.syn_steps"):
        load_config(CONFIG, ["--distill.syn_steps", "0"])


def _write_idx(path: str, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    with gzip.open(path + ".gz", "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _tiny_fashion_mnist(folder) -> str:
    """Ten classes of 28x28 images whose mean brightness differs by class (so a network can learn
    them), in the IDX files the loader reads."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", 200), ("t10k", 60)):
        labels = np.arange(n) % 10
        images = np.clip(rng.normal(20 + 22 * labels[:, None, None], 30, (n, 28, 28)), 0, 255)
        _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), images, 2051)
        _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), labels, 2049)
    return str(folder)


def test_the_config_runs_end_to_end_scaled_down(tmp_path, capsys):
    root = FMNIST_DIR if os.path.isdir(FMNIST_DIR) else _tiny_fashion_mnist(tmp_path / "data")
    run_dir = tmp_path / "run"
    scaled = ["--data.root", root, "--data.train_per_class", "12",
              "--experts.num_experts", "2", "--experts.epochs", "3", "--experts.el2n_epoch", "1",
              "--select.ipc", "2", "--distill.iterations", "2", "--distill.batch_syn", "10",
              "--distill.max_start_epoch", "1", "--distill.checkpoint_every", "1",
              "--tune.eval_runs", "1", "--tune.beta_step", "0.25",
              # 2 images per class matched to 3-epoch experts: at the paper's image learning rate
              # 1000 the first step already crosses the divergence guard
              "--distill.lr_images", "100",
              # and its learned learning rate moves by more than half of itself in the first
              # update at the config's lr_lr (the guard distill.max_lr_change stops that)
              "--distill.lr_lr", "1e-6",
              # compiling costs about a minute per shape on a cold cache: not what this tests
              "--distill.compile", "off",
              "--eval.epochs", "3", "--eval.runs", "1", "--seeds", "0"]
    rc = main(["run", "--config", CONFIG, "--run_dir", str(run_dir), "--workers", "0", *scaled])
    assert rc == 0, capsys.readouterr().err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    methods = results["methods"]  # every row of the paper's comparison, 1 seed x 1 network
    assert set(methods) == {"random", "topk", "window", "init", "mtt", "init_full",
                            "selmatch_dsa", "selmatch", "random_partial"}
    assert all(m["n"] == 1 and 0 <= m["mean"] <= 1 for m in methods.values())
    assert methods["selmatch"]["n_distilled"] == 10  # alpha 0.5 of the 20 images
    report = (run_dir / "report.md").read_text()
    assert "Best row" in report and "fashion_mnist" in report
    # the fashion-MNIST rule: combined augmentation flips real rows (a flipped garment is one)
    assert "crop + flip" in report
