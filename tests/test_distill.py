"""The distillation loop: partial updates, MTT as a special case, α = 0, resume, divergence."""

from __future__ import annotations

import dataclasses

import json
import shutil

import pytest
import torch

from distill import integrity, storage
from distill.config import syn_lr_init
from distill.data import load_configured
from distill.distiller import DivergenceError, Distiller, initial_set
from distill.methods import method_name
from launch.distillation import run_distill
from distill.matching import make_plan
from helpers import match_unrolled, replaced_step
from distill.scores import load_scores
from distill.selection import select_window
from distill.synset import load_synset
from distill.trajectories import ExpertStore
from tiny import distill_killed_at, prepare, tiny_config


def cfg_for(run_dir, **sections):
    return tiny_config(run_dir, **sections)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Experts and forgetting scores once; each test copies them into its own run_dir."""
    root = tmp_path_factory.mktemp("prepared")
    prepare(cfg_for(root))
    return root


def fresh(prepared, tmp_path, **sections):
    for part in ("experts", "scores"):
        shutil.copytree(prepared / part, tmp_path / part)
    return cfg_for(tmp_path, **sections)


def test_partial_update_freezes_select_rows(prepared, tmp_path):
    cfg = fresh(prepared, tmp_path)
    final = run_distill(cfg, progress=False)
    window, _ = load_synset(cfg.run_dir, "selmatch_init")
    saved, state = load_synset(cfg.run_dir, "selmatch")
    frozen = ~state["is_distilled"]
    assert int(state["is_distilled"].sum()) == 20  # floor(0.5 * 4) = 2 per class x 10
    assert torch.equal(state["images"][frozen], window.images()[frozen])  # bit for bit
    assert not torch.equal(state["images"][~frozen], window.images()[~frozen])
    ds = load_configured(cfg.data)
    assert torch.equal(state["images"][frozen], ds.x_train[state["source_index"][frozen]])
    assert state["syn_lr"] != syn_lr_init(cfg) and torch.equal(final.images().detach(), state["images"])
    log = storage.read_text(f"{cfg.run_dir}/logs/distill_selmatch.jsonl").splitlines()
    assert len(log) == 4


def test_alpha_zero_is_the_window_selection(prepared, tmp_path):
    cfg = fresh(prepared, tmp_path, distill={"alpha": 0.0})
    run_distill(cfg, progress=False)
    window, _ = load_synset(cfg.run_dir, "selmatch_init")
    _, state = load_synset(cfg.run_dir, "selmatch")
    assert torch.equal(state["images"], window.images())
    ds = load_configured(cfg.data)
    scores = load_scores(cfg.run_dir, "forgetting")
    sel = select_window(scores, ds.y_train.numpy(), 10, 4, 0.2, 0.0)
    assert torch.equal(state["source_index"], sel.source_index)
    assert torch.equal(state["images"], ds.x_train[sel.source_index])
    assert not state["is_distilled"].any()
    assert not storage.exists(f"{cfg.run_dir}/checkpoints/selmatch.pt")


def test_alpha_one_random_init_is_plain_mtt(prepared, tmp_path):
    """MTT written out in the test (full unroll, SGD with momentum) vs the distiller, float64."""
    cfg = fresh(prepared, tmp_path, select={"init": "random"}, distill={"alpha": 1.0})
    ds = load_configured(cfg.data)
    synset = initial_set(cfg, ds).to("cpu", torch.float64)
    assert synset.is_distilled.all() and len(synset.selected) == 0
    distiller = Distiller(cfg, ds, synset, ExpertStore(cfg))
    assert method_name(cfg) == "mtt" and not distiller.merge

    images = synset.images().detach().clone()
    lr = synset.syn_lr.detach().clone()
    assert abs(float(lr) - syn_lr_init(cfg)) < 1e-8  # experts.lr, as in MTT
    v_img, v_lr = torch.zeros_like(images), torch.zeros_like(lr)
    store = ExpertStore(cfg)
    for it in range(3):
        expert, t = distiller.sample_segment(it)
        traj = store.trajectory(expert).double()
        plan = make_plan(len(images), batch=8, steps=3, group=8, image_size=(8, 8),
                         dsa=distiller.dsa, seed=cfg.seed, iteration=it)
        res = match_unrolled(distiller.student, traj[t], traj[t + 1], images, synset.labels, lr,
                             plan)
        v_img = 0.5 * v_img + res.grad_images  # torch SGD momentum: v = m v + g; p -= lr v
        v_lr = 0.5 * v_lr + res.grad_lr
        images = images - 100.0 * v_img
        lr = lr - 1e-5 * v_lr
        distiller.step(it)
    got = synset.images().detach()
    assert float((got - images).norm() / images.norm()) < 1e-9
    assert abs(float(synset.syn_lr.detach()) - float(lr)) < 1e-12
    assert not torch.equal(got, initial_set(cfg, ds).images().double())


def test_resume_is_bitwise(prepared, tmp_path):
    full = fresh(prepared, tmp_path / "full", distill={"iterations": 6, "checkpoint_every": 2})
    run_distill(full, progress=False)
    _, want = load_synset(full.run_dir, "selmatch")

    part = fresh(prepared, tmp_path / "part", distill={"iterations": 6, "checkpoint_every": 2})
    distill_killed_at(part, 5)
    assert integrity.torch_load(f"{part.run_dir}/checkpoints/selmatch.pt", fix="-")["iteration"] == 4
    run_distill(part, resume=True, progress=False)
    _, got = load_synset(part.run_dir, "selmatch")
    assert torch.equal(got["images"], want["images"])
    assert got["syn_lr"] == want["syn_lr"]
    lines = storage.read_text(f"{part.run_dir}/logs/distill_selmatch.jsonl").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_with_other_settings_is_refused(prepared, tmp_path):
    cfg = fresh(prepared, tmp_path, distill={"iterations": 2})
    run_distill(cfg, progress=False)
    other = cfg_for(tmp_path, distill={"iterations": 4, "alpha": 0.75})
    with pytest.raises(ValueError, match="other settings"):
        run_distill(other, resume=True, progress=False)
    longer = cfg_for(tmp_path, distill={"iterations": 4})  # more iterations is allowed
    run_distill(longer, resume=True, progress=False)


def test_divergence_stops_with_clear_error_and_keeps_checkpoint(prepared, tmp_path):
    cfg = fresh(prepared, tmp_path, distill={"iterations": 6, "checkpoint_every": 2})
    def poison(real_step, self, iteration):
        if iteration == 3:
            with torch.no_grad():
                self.synset.distilled[:, 0, 0, 0] = float("nan")
        return real_step(self, iteration)

    with replaced_step(poison), pytest.raises(DivergenceError,
                                              match="not finite at iteration 3.*lr_images"):
        run_distill(cfg, progress=False)
    ckpt = integrity.torch_load(f"{cfg.run_dir}/checkpoints/selmatch.pt", fix="-")
    assert ckpt["iteration"] == 2 and torch.isfinite(ckpt["distilled"]).all()
    assert not storage.exists(f"{cfg.run_dir}/synset/selmatch.pt")


def test_merge_distills_the_easy_part_alone(prepared, tmp_path, monkeypatch):
    """Merge matches D_distill alone: every student step draws from the 20 learnable images
    (joint mode: from all 40), and the result differs from the joint run's."""
    import distill.distiller as distiller_mod

    drawn = []
    real_plan = distiller_mod.make_plan
    monkeypatch.setattr(distiller_mod, "make_plan",
                        lambda n, **kw: (drawn.append(n), real_plan(n, **kw))[1])
    cfg = fresh(prepared, tmp_path, distill={"mode": "merge", "batch_syn": 10})
    run_distill(cfg, progress=False)
    window, _ = load_synset(cfg.run_dir, "merge_init")
    _, state = load_synset(cfg.run_dir, "merge")
    frozen = ~state["is_distilled"]
    assert set(drawn) == {int(state["is_distilled"].sum())} == {20}
    assert torch.equal(state["images"][frozen], window.images()[frozen])
    assert not torch.equal(state["images"][~frozen], window.images()[~frozen])
    joint = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, mode="joint"))
    drawn.clear()
    run_distill(joint, progress=False)
    _, other = load_synset(cfg.run_dir, "selmatch")
    assert set(drawn) == {40} and not torch.equal(other["images"], state["images"])


def test_merge_with_default_batch_and_group_runs(prepared, tmp_path, capsys, monkeypatch):
    """A bug once: ``selmatch distill --distill.mode merge --distill.batch_syn null
    --distill.bn_group null`` passed validation, then the Distiller refused g = the whole set
    (40) for a batch capped at the 20 images matched. Both are 20 now, and it runs."""
    from distill.config_io import dump_yaml
    from launch.cli import main

    cfg = fresh(prepared, tmp_path, distill={"mode": "merge", "batch_syn": None,
                                             "bn_group": None, "iterations": 2})
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    seen = []
    real_init = Distiller.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append((self.batch, self.group))

    monkeypatch.setattr(Distiller, "__init__", init)
    assert main(["distill", "--config", str(path)]) == 0, capsys.readouterr().err
    assert seen == [(20, 20)]  # floor(0.5 * 4) = 2 learnable images per class, 10 classes
    _, state = load_synset(cfg.run_dir, "merge")
    assert int(state["is_distilled"].sum()) == 20


def test_distill_without_experts_says_what_to_run(tmp_path):
    cfg = cfg_for(tmp_path, select={"init": "random"})
    with pytest.raises(FileNotFoundError, match="selmatch experts"):
        run_distill(cfg, progress=False)
