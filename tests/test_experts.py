"""Experts: determinism (Ray == in-process), resumption, corrupt files, forgetting, score import."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from distill import storage
from distill.config_io import from_dict
from distill.experts import forgetting_counts
from distill.scores import (
    compute_scores,
    from_experts,
    import_scores,
    load_scores,
    save_scores,
)
from distill.trajectories import ExpertStore
from launch import experts as launch_experts
from distill.data import get_info, load_configured
from launch.experts import run_experts


def tiny_cfg(run_dir: str, **experts):
    return from_dict({
        "run_dir": str(run_dir),
        "seed": 3,
        "data": {"name": "digits", "train_per_class": 30},
        "model": {"name": "convnet", "width": 8, "depth": 2},
        "experts": {"num_experts": 2, "epochs": 3, "batch_size": 64, "el2n_epoch": 1, **experts},
        "select": {"ipc": 5},
        "distill": {"max_start_epoch": 1, "expert_epochs": 1},
    })


def test_forgetting_counts_hand_table():
    # rows: presentations (epochs); columns: samples
    correct = torch.tensor([
        [1, 1, 0, 0, 1, 0],
        [0, 1, 1, 0, 1, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 1, 0],
    ], dtype=torch.bool)
    # sample 0: 1→0 twice (epochs 0→1, 2→3) = 2; sample 1: never forgotten = 0;
    # sample 2: 1→0 once (1→2) = 1; samples 3, 5: never learned = E = 4; sample 4: once = 1.
    assert forgetting_counts(correct).tolist() == [2, 0, 1, 4, 1, 4]


def test_ray_matches_in_process_bitwise(tmp_path, ray_local):
    cfg_a = tiny_cfg(tmp_path / "a")
    cfg_b = tiny_cfg(tmp_path / "b")
    run_experts(cfg_a, workers=0, progress=False)
    run_experts(cfg_b, workers=None, progress=False)
    a, b = ExpertStore(cfg_a).load_all(), ExpertStore(cfg_b).load_all()
    assert [e.expert_id for e in a] == [e.expert_id for e in b] == [0, 1]
    for ea, eb in zip(a, b):
        assert torch.equal(ea.trajectory, eb.trajectory)
        assert torch.equal(ea.correct, eb.correct)
        assert torch.equal(ea.el2n, eb.el2n)
        assert ea.test_acc == eb.test_acc
    # different experts really differ (seeded by expert id)
    assert not torch.equal(a[0].trajectory[0], a[1].trajectory[0])


def test_trajectory_layout_and_learning(tmp_path):
    cfg = tiny_cfg(tmp_path, num_experts=1, epochs=6, lr=0.05, batch_size=32)
    run_experts(cfg, workers=0, progress=False)
    (e,) = ExpertStore(cfg).load_all()
    assert e.trajectory.dtype == torch.float32
    assert e.trajectory.shape == (7, e.layout.numel)
    assert e.correct.shape == (6, 300)
    assert not torch.equal(e.trajectory[0], e.trajectory[-1])
    # 10 classes: well above chance, and better than after the first epoch
    assert e.test_acc[-1] > 0.3 and e.test_acc[-1] > e.test_acc[0]
    manifest = storage.read_json(str(tmp_path / "experts" / "manifest.json"))
    assert manifest["dataset"] == "digits" and manifest["epochs"] == 6
    assert len(manifest["experts"]["0"]["test_acc"]) == 6


def test_crash_then_rerun_trains_only_missing(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    real = launch_experts.train_and_save
    calls = []

    def crash_on_second(cfg_, ds, expert_id, progress=False):
        calls.append(expert_id)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(cfg_, ds, expert_id, progress)

    monkeypatch.setattr(launch_experts, "train_and_save", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_experts(cfg, workers=0, progress=False)
    store = ExpertStore(cfg)
    assert store.finished_ids() == [0]
    first = storage.read_bytes(str(tmp_path / "experts" / "expert_0000.pt"))

    calls.clear()
    monkeypatch.setattr(launch_experts, "train_and_save",
                        lambda c, d, i, progress=False: (calls.append(i), real(c, d, i, progress))[1])
    run_experts(cfg, workers=0, progress=False)
    assert calls == [1]
    assert store.finished_ids() == [0, 1]
    assert storage.read_bytes(str(tmp_path / "experts" / "expert_0000.pt")) == first
    calls.clear()
    run_experts(cfg, workers=0, progress=False)
    assert calls == []


def test_truncated_expert_file_is_named(tmp_path):
    cfg = tiny_cfg(tmp_path, num_experts=1, epochs=2)
    run_experts(cfg, workers=0, progress=False)
    path = tmp_path / "experts" / "expert_0000.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    store = ExpertStore(cfg)
    assert store.finished_ids() == []  # a damaged file does not count as finished
    with pytest.raises(ValueError, match="expert_0000.pt.*truncated"):
        store.load(0)
    path.write_bytes(data[:-8] + b"\x00" * 8)  # same size, different bytes
    with pytest.raises(ValueError, match="expert_0000.pt.*sha256 differs"):
        store.load(0)


def test_missing_experts_say_which_command(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(FileNotFoundError, match="selmatch experts"):
        ExpertStore(cfg).load_all()


def test_changed_settings_do_not_reuse_experts(tmp_path):
    run_experts(tiny_cfg(tmp_path, num_experts=1, epochs=2), workers=0, progress=False)
    # more experts or other resources: same store; another lr: refused with a clear message
    assert ExpertStore(tiny_cfg(tmp_path, num_experts=3, epochs=2)).missing_ids() == [1, 2]
    with pytest.raises(ValueError, match="other settings"):
        ExpertStore(tiny_cfg(tmp_path, num_experts=1, epochs=2, lr=0.02)).missing_ids()


def test_scores_from_experts_and_roundtrip(tmp_path):
    cfg = tiny_cfg(tmp_path)
    run_experts(cfg, workers=0, progress=False)
    experts = ExpertStore(cfg).load_all()
    ds = load_configured(cfg.data)
    forget = compute_scores(cfg, ds, ExpertStore(cfg).load_all())
    assert forget.kind == "forgetting" and forget.hard_end == "high"
    expected = np.mean([forgetting_counts(e.correct).numpy() for e in experts], axis=0)
    np.testing.assert_allclose(forget.values, expected)
    el2n = from_experts("el2n", experts)
    assert el2n.values.shape == (300,) and (el2n.values >= 0).all()
    save_scores(str(tmp_path), el2n)
    again = load_scores(str(tmp_path), "el2n")
    np.testing.assert_array_equal(again.values, el2n.values)
    assert again.hard_end == "high"


def test_imported_scores_checked(tmp_path):
    cfg = tiny_cfg(tmp_path)
    ds = load_configured(cfg.data)
    n = len(ds.y_train)
    np.save(tmp_path / "short.npy", np.zeros(n - 1))
    with pytest.raises(ValueError, match=f"{n - 1} scores but digits has {n} "):
        import_scores(str(tmp_path / "short.npy"), "forgetting", ds)
    # a full-length file is mapped onto the train_per_class subset through train_index
    n_full = get_info("digits").train_size
    assert n_full > n
    np.save(tmp_path / "full.npy", np.arange(n_full, dtype=float))
    sub = import_scores(str(tmp_path / "full.npy"), "forgetting", ds)
    np.testing.assert_array_equal(sub.values, ds.train_index.numpy().astype(float))
    labels = ds.y_train.numpy().copy()
    labels[0] = (labels[0] + 1) % 10
    np.savez(tmp_path / "c.npz", scores=np.arange(n, dtype=float), labels=labels)
    with pytest.raises(ValueError, match="labels differ.*1 positions"):
        import_scores(str(tmp_path / "c.npz"), "cscore", ds)
    np.savez(tmp_path / "ok.npz", scores=np.arange(n, dtype=float), labels=ds.y_train.numpy())
    ok = import_scores(str(tmp_path / "ok.npz"), "cscore", ds)
    assert ok.hard_end == "low" and ok.values[5] == 5.0
    with pytest.raises(ValueError, match="no array 'oops'"):
        import_scores(str(tmp_path / "ok.npz"), "cscore", ds, key="oops")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_scores(str(tmp_path / "none.npy"), "cscore", ds)


def test_shipped_cscores_match_cifar_label_order():
    # The shipped C-score file carries labels; they must be CIFAR-10's training order.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = np.load(os.path.join(repo, "configs", "scores", "cscores_CIFAR10.npz"))
    assert data["scores"].shape == (50000,)
    assert data["labels"][:8].tolist() == [6, 9, 9, 4, 1, 1, 2, 7]
