"""One pipeline model (distill/artifacts.py, distill/freshness.py): every command asks the stage
table whether an artifact is fresh and what is missing, choices flow from stage to stage, and a
changed field makes stale exactly the artifacts the table says are made of it.

The run below makes every kind of artifact once (experts, both scores, the window search, every
row's set of one seed, evaluations, the tune trials and choice, the report) on the tiny digits
problem; the tests then change one thing at a time and ask."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from distill import storage
from distill.artifacts import KINDS, Ref, closure, refs_of
from distill.config import RunConfig, to_dict
from distill.config_io import dump_yaml, from_dict, load_config
from distill.freshness import Freshness
from distill.methods import with_fields
from distill.synset import load_synset
from launch import stages
from launch.pipeline import run_pipeline
from tiny import config_file, prepare, run_cli, tiny_config
from tune.main import run_tune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECTIONS = dict(
    select={"beta": None, "init": "auto"},  # the window search decides SelMatch's start
    distill={"max_start_epoch": 1, "iterations": 2},
    scores={"topk": "el2n"},  # so that both score artifacts exist
    eval={"model": "convnet", "runs": 1, "epochs": 2, "batch_size": 32},
    tune={"beta_step": 0.25, "beta_epoch_fraction": 0.5, "alpha_iterations": 1,
          "alpha_step": 0.5, "max_concurrent": 1},
)


def model_config(run_dir, **more) -> RunConfig:
    sections = {k: {**v, **more.pop(k, {})} for k, v in SECTIONS.items()}
    return tiny_config(run_dir, **sections, **more)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    cfg = prepare(model_config(root))
    run_tune(cfg, use_ray=False)
    run_pipeline(cfg, workers=0)
    np.save(root / "other_scores.npy", np.arange(300, dtype=np.float64))  # scores.file's value
    return cfg


def copy_of(made, tmp_path) -> RunConfig:
    shutil.copytree(made.run_dir, tmp_path / "run")
    return dataclasses.replace(made, run_dir=str(tmp_path / "run"))


# --------------------------------------------------------------------------------------------
# The table-driven test: one alternative value per config field
# --------------------------------------------------------------------------------------------


ALTERNATIVES = {
    "tuned": True, "seed": 6, "seeds": [5, 6],
    "data.name": "fashion_mnist", "data.root": "/tmp/elsewhere", "data.download": True,
    "data.train_per_class": 31, "data.options": None,  # digits takes no options: see below
    "model.name": "resnet18", "model.width": 9, "model.depth": 2, "model.norm": "instance",
    "experts.num_experts": 3, "experts.epochs": 4, "experts.lr": 0.06, "experts.momentum": 0.1,
    "experts.weight_decay": 1e-4, "experts.batch_size": 33, "experts.augment": "none",
    "experts.el2n_epoch": 2, "experts.num_cpus": 2.0, "experts.num_gpus": 0.5,
    "scores.kind": "el2n", "scores.file": "OTHER_SCORES", "scores.key": "values",
    "scores.topk": "forgetting", "scores.topk_file": "OTHER_SCORES",
    "select.ipc": 3, "select.beta": 0.25, "select.init": "window",
    "distill.alpha": 0.75, "distill.iterations": 3, "distill.syn_steps": 4,
    "distill.expert_epochs": 2, "distill.max_start_epoch": 2, "distill.batch_syn": 10,
    "distill.bn_group": 4, "distill.lr_images": 50.0, "distill.lr_lr": 2e-5,
    "distill.syn_lr_init": 0.02, "distill.momentum": 0.6, "distill.mode": "merge",
    "distill.augment": "none", "distill.compile": "off", "distill.cuda_graphs": False,
    "distill.group_ranks": 2, "distill.groups_per_call": 1, "distill.precision": "fp32",
    "distill.checkpoint_every": 3, "distill.log_every": 2, "distill.check_every": 51,
    "distill.num_threads": 2, "distill.max_image_ratio": 30.0, "distill.max_loss_ratio": 30.0,
    "distill.max_lr_change": 0.9,
    "eval.model": "resnet18", "eval.width": 16, "eval.depth": 2, "eval.norm": "instance",
    "eval.runs": 2, "eval.epochs": 3, "eval.lr": 0.05, "eval.momentum": 0.8,
    "eval.weight_decay": 1e-3, "eval.batch_size": 16, "eval.num_cpus": 2.0,
    "eval.num_gpus": 0.0, "eval.augment": "combined", "eval.flip": True,
    "eval.crop_fill": "mean", "eval.methods": ["random", "selmatch"],
    "tune.beta_step": 0.2, "tune.alpha_step": 0.25, "tune.beta_epoch_fraction": 0.4,
    "tune.alpha_fraction": 0.3, "tune.alpha_iterations": 2, "tune.alpha_epoch_fraction": 0.4,
    "tune.val_fraction": 0.2, "tune.eval_runs": 2, "tune.beta_bound": 0.5,
    "tune.alpha_bound": 0.5, "tune.beta_start": 0.25, "tune.alpha_start": 0.5,
    "tune.max_concurrent": 2, "tune.num_cpus": 2.0, "tune.num_gpus": 0.5,
    "metrics.tensorboard": True,
}
"""Another valid value for every config field but run_dir (the artifacts' location, not what
they are made of). data.options has none for digits (it takes no options)."""


def dotted_fields(cfg: RunConfig) -> list[str]:
    out = []
    for key, value in to_dict(cfg).items():
        out += [f"{key}.{k}" for k in value] if isinstance(value, dict) else [key]
    return out


def roles(cfg: RunConfig) -> dict[tuple, Ref]:
    """Every artifact of a run with tune, by its role: (kind, name or which scores, seed
    position), so that a field that renames an artifact (scores.kind) is followed to the one
    that now plays its part."""
    seeds = cfg.seeds or [cfg.seed]
    out = {}
    made_with = [Ref(kind, r.name, r.seed) for r in refs_of(cfg) if r.kind == "set"
                 for kind in ("init", "checkpoint")]  # written by each distillation
    for ref in [*refs_of(cfg), *made_with, Ref("beta_trials"), Ref("alpha_trials"),
                Ref("tuned")]:
        name = ref.name
        if ref.kind == "scores":
            name = "kind" if ref.name == cfg.scores.kind else "topk"
        pos = None if ref.seed is None else seeds.index(ref.seed)
        out[ref.kind, name, pos] = ref
    return out


def test_every_field_has_an_alternative(made):
    assert set(ALTERNATIVES) == set(dotted_fields(made)) - {"run_dir"}


def test_the_made_run_has_every_kind_and_everything_is_fresh(made):
    got = roles(made)
    assert {role[0] for role in got} == set(KINDS)
    check = Freshness(made)
    stale = {str(r): check.status(r).why for r in got.values() if not check.status(r).fresh}
    assert not stale


@pytest.mark.parametrize("field", sorted(ALTERNATIVES))
def test_a_field_makes_stale_exactly_what_the_table_says_is_made_of_it(made, field):
    value = ALTERNATIVES[field]
    if field == "data.options":
        pytest.skip("digits takes no data.options (every value but {} is refused)")
    if value == "OTHER_SCORES":
        value = f"{made.run_dir}/other_scores.npy"
    changed = with_fields(made, {field: value}) if "." in field else \
        dataclasses.replace(made, **{field: value})
    changed = from_dict(to_dict(changed))  # a valid config
    check = Freshness(changed)
    before, after = roles(made), roles(changed)
    wrong = []
    for role, ref in before.items():
        if role not in after:  # a row no longer asked for (eval.methods)
            continue
        declared = field in closure(made, ref) | closure(changed, after[role])
        stale = not check.status(after[role]).fresh
        if stale != declared:
            wrong.append(f"{after[role]}: stale {stale}, table says {declared} "
                         f"({check.status(after[role]).why})")
    assert not wrong, wrong


# --------------------------------------------------------------------------------------------
# What standalone commands and run agree on
# --------------------------------------------------------------------------------------------


def test_grown_experts_make_distill_and_evaluate_refuse_and_run_remake(made, tmp_path, capsys):
    cfg = copy_of(made, tmp_path)
    path = config_file(cfg, tmp_path / "c.yaml")
    assert run_cli(capsys, "experts", "--workers", "0", "--config", path,
                   "--experts.num_experts", "3")[0] == 0
    rc, err = run_cli(capsys, "distill", "--config", path, "--experts.num_experts", "3")
    assert rc == 2 and "scores forgetting" in err and "made from other experts" in err
    assert "selmatch scores --config" in err
    rc, err = run_cli(capsys, "evaluate", "--workers", "0", "--config", path,
                      "--experts.num_experts", "3")
    assert rc == 2 and "set selmatch (seed 5)" in err and "scores forgetting" in err
    cfg3 = with_fields(cfg, {"experts.num_experts": 3})
    before = load_synset(cfg.run_dir, "selmatch")[1]["meta"]["stamp"]
    run_pipeline(cfg3, workers=0)
    after = load_synset(cfg.run_dir, "selmatch")[1]["meta"]
    assert after["stamp"] != before and after["made_of"]["inputs"]["experts"]
    assert not [r for r in roles(cfg3).values() if not Freshness(cfg3).status(r).fresh
                and r.kind not in ("beta_trials", "alpha_trials", "tuned")]


def test_the_initial_set_copied_over_the_final_set_is_refused_and_remade(made, tmp_path, capsys):
    cfg = copy_of(made, tmp_path)
    synset = f"{cfg.run_dir}/synset"
    for suffix in ("", ".sha256"):  # with its checksum: the sidecar names the other file
        shutil.copy(f"{synset}/selmatch_init.pt{suffix}", f"{synset}/selmatch.pt{suffix}")
    path = config_file(cfg, tmp_path / "c.yaml")
    rc, err = run_cli(capsys, "evaluate", "--workers", "0", "--config", path)
    assert rc == 2 and f"{synset}/selmatch.pt is damaged" in err
    # re-signed as its own file: the stamp's role says what it is
    from distill import integrity

    integrity.write_bytes(f"{synset}/selmatch.pt", open(f"{synset}/selmatch_init.pt", "rb").read())
    rc, err = run_cli(capsys, "evaluate", "--workers", "0", "--config", path)
    assert rc == 2 and "it is the init 'selmatch'" in err and "not the set 'selmatch'" in err
    run_pipeline(cfg, workers=0)  # the owner makes it again
    meta = load_synset(cfg.run_dir, "selmatch")[1]["meta"]
    assert meta["made_of"]["artifact"] == "set" and Freshness(cfg).status(
        Ref("set", "selmatch")).fresh


def test_another_alpha_reevaluates_no_selection_row(made, tmp_path, monkeypatch):
    cfg = copy_of(made, tmp_path)
    evaluated = []
    real = stages.evaluate_sets
    monkeypatch.setattr(stages, "evaluate_sets", lambda c, ds, sets, **k: (
        evaluated.extend(ref.name for ref in sets), real(c, ds, sets, **k))[1])
    run_pipeline(with_fields(cfg, {"distill.alpha": 0.75}), workers=0)
    assert set(evaluated) == {"selmatch", "selmatch_dsa", "random_partial"}


def test_crop_fill_makes_stale_the_trials_whose_augmentation_crops(made):
    """α trials are scored with SelMatch's combined augmentation: crop_fill is part of them; β
    trials with the window's DSA are not, unless eval.augment makes every row crop (then the
    window search and the β trials both are: one rule)."""
    mean = with_fields(made, {"eval.crop_fill": "mean"})
    check = Freshness(mean)
    assert not check.status(Ref("alpha_trials")).fresh
    assert check.status(Ref("beta_trials")).fresh and check.status(Ref("window")).fresh
    combined = with_fields(made, {"eval.augment": "combined"})
    for ref in (Ref("beta_trials"), Ref("window")):
        assert "eval.crop_fill" not in closure(made, ref)
        assert "eval.crop_fill" in closure(combined, ref)


def test_selmatch_starts_where_the_window_search_decided(made):
    window = json.loads(storage.read_text(f"{made.run_dir}/window/results.json"))
    meta = load_synset(made.run_dir, "selmatch_init")[1]["meta"]
    decided = window["start"]
    assert meta["start"]["source"] == "window search"
    assert meta["start"]["init"] == decided["init"] and meta["start"]["beta"] == decided["beta"]
    init = load_synset(made.run_dir, "init")[1]["meta"]  # the start alone, same decision
    assert init["start"] == meta["start"]
    results = json.loads(storage.read_text(f"{made.run_dir}/results.json"))
    assert results["methods"]["selmatch"]["start"]["source"] == "window search"
    report = storage.read_text(f"{made.run_dir}/report.md")
    assert "(window search)" in report and "| 0.5 (config) |" in report


def test_a_pinned_beta_is_respected(made, tmp_path):
    cfg = with_fields(copy_of(made, tmp_path), {"select.beta": 0.25, "select.init": "window",
                                                "eval.methods": ["selmatch"]})
    run_pipeline(cfg, workers=0)
    meta = load_synset(cfg.run_dir, "selmatch")[1]["meta"]
    assert meta["start"] == {"init": "window", "beta": 0.25, "source": "config"}


def test_tuned_takes_selected_yaml_and_refuses_a_stale_choice(made, tmp_path, capsys):
    cfg = copy_of(made, tmp_path)
    import yaml

    chosen = yaml.safe_load(storage.read_text(f"{cfg.run_dir}/tune/selected.yaml"))
    path = config_file(cfg, tmp_path / "c.yaml")
    tuned = load_config(path, ["--tuned=true"])
    assert (tuned.select.init, tuned.select.beta, tuned.distill.alpha) == \
        (chosen["select"]["init"], chosen["select"]["beta"], chosen["distill"]["alpha"])
    overridden = load_config(path, ["--tuned=true", "--distill.alpha", "0.25"])
    assert overridden.distill.alpha == 0.25  # the command line wins
    rc, err = run_cli(capsys, "run", "--workers", "0", "--config", path, "--tuned",
                      "--eval.methods", "[selmatch]")
    assert rc == 0, err
    meta = load_synset(cfg.run_dir, "selmatch")[1]["meta"]
    assert meta["alpha"] == chosen["distill"]["alpha"] and meta["alpha_source"] == "tune"
    assert meta["start"]["init"] == chosen["select"]["init"] and meta["start"]["source"] == "tune"
    rc, err = run_cli(capsys, "run", "--workers", "0", "--config", path, "--tuned",
                      "--tune.eval_runs", "2")
    assert rc == 2 and "tuned" in err and "selmatch tune" in err


def test_a_distillation_whose_result_is_fresh_is_skipped_unless_forced(made, tmp_path):
    cfg = copy_of(made, tmp_path)
    cfg = with_fields(cfg, {"select.beta": 0.25, "select.init": "window"})  # no search needed
    path = str(tmp_path / "c.yaml")
    open(path, "w").write(dump_yaml(cfg))
    script = os.path.join(REPO, "distill", "main.py")
    first = subprocess.run([sys.executable, script, "--config", path], capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    url = f"{cfg.run_dir}/synset/selmatch.pt"
    stamp = os.stat(url).st_mtime_ns
    again = subprocess.run([sys.executable, script, "--config", path], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "present and fresh, skipped" in again.stderr
    assert os.stat(url).st_mtime_ns == stamp
    forced = subprocess.run([sys.executable, script, "--config", path, "--force"],
                            capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0 and "made again (--force)" in forced.stderr
    assert os.stat(url).st_mtime_ns != stamp


def test_a_rerun_with_nothing_to_do_writes_nothing(made, tmp_path):
    cfg = copy_of(made, tmp_path)
    run_pipeline(cfg, workers=0)  # the copy's config.yaml names its new run_dir
    before = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    run_pipeline(cfg, workers=0)
    after = {p: os.stat(p).st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    changed = sorted(str(p) for p in after if before.get(p) != after[p])
    assert not changed, changed


def test_the_pipeline_page_is_the_table(made):
    from distill.artifacts import pipeline_markdown

    with open(os.path.join(REPO, "docs", "pipeline.md")) as f:
        page = f.read()
    assert pipeline_markdown() in page, "regenerate: python -m distill.artifacts > docs/pipeline.md"
