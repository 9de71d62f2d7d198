"""The searches compare like with like and say when they cannot tell (distill/search.py), the
report opens with its conclusion, the real rows of digits never flip, the α trial distils through
the one distillation path, and missing stages are named all at once with the user's arguments."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from distill import search, storage
from distill.augment import build_augment, translate
from distill.config_io import dump_yaml
from distill.data import load_configured
from distill.metrics import read_jsonl
from distill.methods import real_augment
from distill.report import conclusion, conclusion_lines
from distill.scores import load_scores
from distill.search import Point, SearchContext, decide, difference
from launch.cli import main
from tiny import prepare, tiny_config


def tiny_search(run_dir, **tune):
    # a ConvNet wide enough to learn something in 4 epochs on 40 images of 10 classes
    return tiny_config(run_dir, seed=3,
                       eval={"model": "convnet", "width": 32, "depth": 2, "epochs": 20,
                             "batch_size": 32},
                       tune={"beta_step": 0.2, "alpha_step": 0.5, "beta_epoch_fraction": 0.2,
                             "alpha_iterations": 3, "eval_runs": 2, **tune})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(tiny_search(tmp_path_factory.mktemp("search")))


# --------------------------------------------------------------------------------------------
# One validation set for every candidate


def test_every_candidate_is_scored_on_the_same_validation_images(prepared, monkeypatch):
    cfg = prepared
    ds = load_configured(cfg.data)
    seen = []
    real = search.run_jobs

    def spy(cfg_, ds_, sets, jobs, **kw):
        seen.append((ds_.x_test.clone(), ds_.y_test.clone(), sets["candidate"]))
        return real(cfg_, ds_, sets, jobs, **kw)

    monkeypatch.setattr(search, "run_jobs", spy)
    scores = load_scores(cfg.run_dir, "forgetting")
    result = search.window_search(cfg, ds, scores, progress=False)
    ctx = SearchContext(cfg, ds, scores)
    val = ctx.val
    assert result["validation_size"] == len(val) == 30  # round(0.1 * 30) per class
    assert result["pool_size"] == len(ds.y_train) - 30 and result["validation_seed"] == cfg.seed
    assert len(seen) == len(result["betas"]) + len(result["references"])  # each β + random
    for x, y, images in seen:  # one validation set, the same for every candidate
        assert torch.equal(x, ds.x_train[val]) and torch.equal(y, ds.y_train[val])
    for beta in result["betas"]:  # no candidate trains on a validation image
        sel = ctx.selection(beta, 0.0)
        assert not set(sel.source_index.tolist()) & set(val.tolist())
        assert result["points"][f"{beta:g}"]["n_val"] == 30
    random = ctx.selection(0.0, 0.0, init="random")
    assert not set(random.source_index.tolist()) & set(val.tolist())
    # the recorded images are the trained networks' own answers, two seeds per point
    point = Point.from_record(result["points"][f"{result['betas'][0]:g}"])
    assert point.correct.shape == (2, 30)
    assert point.acc == pytest.approx(result["val_accuracy"][0])


def test_run_and_tune_give_the_same_number_for_the_same_beta(prepared):
    from distill.freshness import Freshness
    from launch.stages import stage_window
    from tune.main import run_tune

    cfg = prepared
    window = stage_window(Freshness(cfg), load_configured(cfg.data))
    summary = run_tune(cfg, use_ray=False)
    trials = read_jsonl(storage.join(cfg.run_dir, "tune", "beta", "trials.jsonl"))
    both = [r for r in trials if r["value"] is not None and f"{r['value']:g}" in window["points"]]
    assert both, "the two searches share no β"
    for rec in both:
        point = window["points"][f"{rec['value']:g}"]
        assert rec["metric"] == point["val_acc"] and rec["correct"] == point["correct"]
    # and the random subset they both weigh the windows against
    (ref,) = [r for r in trials if r.get("reference") == "random"]
    assert ref["correct"] == window["references"]["random"]["correct"]
    assert summary["split"]["validation_size"] == window["validation_size"]
    text = storage.read_text(storage.join(cfg.run_dir, "tune", "selected.yaml"))
    assert "validation split: 30 training images (0.1 of each class, drawn from seed 3)" in text


# --------------------------------------------------------------------------------------------
# Noise: ties and chance


def _point(rows: list[list[int]]) -> Point:
    return Point(torch.tensor(rows, dtype=torch.bool))


def test_paired_difference_uses_the_same_images():
    a = _point([[1, 1, 1, 0] * 25])
    b = _point([[1, 1, 0, 0] * 25])
    lead, se = difference(a, b)
    assert lead == pytest.approx(0.25)
    per_image = torch.tensor([0.0, 0.0, 1.0, 0.0] * 25, dtype=torch.float64)
    assert se == pytest.approx(float(per_image.std() / math.sqrt(100)))
    with pytest.raises(ValueError, match="different validation sets"):
        difference(a, _point([[1, 0]]))


def test_a_flat_search_warns_and_keeps_the_start():
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.6
    base[:3] = False
    points = {}
    for k, beta in enumerate((0.0, 0.2, 0.4, 0.6)):  # the same network but 1-2 images apart
        row = base.copy()
        row[:k] = True
        points[beta] = Point(torch.from_numpy(row)[None])
    d = decide(points, start=0.2, chance=0.1, kind="beta")
    assert d.best == 0.6 and set(d.tied) == {0.0, 0.2, 0.4, 0.6}
    assert d.value == 0.2  # the tie rule: nearest the start
    assert any("not better than" in w and "tie rule" in w for w in d.warnings)


def test_a_clear_winner_is_chosen_without_warning():
    n = 200
    good = torch.zeros(n, dtype=torch.bool)
    good[:180] = True
    bad = torch.zeros(n, dtype=torch.bool)
    bad[:100] = True
    d = decide({0.0: Point(bad[None]), 0.2: Point(good[None]), 0.4: Point(bad[None]),
                0.6: None}, start=0.4, chance=0.1, kind="beta")  # None: a failed trial
    assert (d.value, d.best, d.tied, d.warnings) == (0.2, 0.2, [0.2], [])


def test_a_chance_level_search_warns():
    n = 150
    row = torch.zeros(n, dtype=torch.bool)
    row[:16] = True  # 10.7% with chance 10%
    d = decide({0.0: Point(row[None]), 0.5: Point(row[None])}, start=0.5, chance=0.1,
               kind="alpha")
    assert d.value == 0.5 and any("alpha search at chance" in w for w in d.warnings)


def test_chance_level_search_warns_in_results_report_and_selected_yaml(tmp_path):
    """Trials too short to learn (1 epoch, width 4): every warning reaches the user."""
    from launch.pipeline import run_pipeline
    from tune.main import run_tune

    cfg = prepare(tiny_config(tmp_path, seed=4, eval={"model": "convnet", "width": 4,
                                                      "depth": 1, "runs": 1, "epochs": 2},
                              tune={"beta_step": 0.4, "alpha_step": 0.5,
                                    "beta_epoch_fraction": 0.5, "alpha_iterations": 1},
                              distill={"iterations": 1}))
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval,
                                                             methods=["random", "window"]))
    run_pipeline(cfg, workers=0)
    window = storage.read_json(f"{tmp_path}/window/results.json")
    warnings = window["decision"]["warnings"]
    assert any("beta search at chance" in w for w in warnings)
    report = storage.read_text(f"{tmp_path}/report.md")
    assert all(f"**WARNING: {w}**" in report for w in warnings)
    run_tune(cfg, use_ray=False)
    text = storage.read_text(f"{tmp_path}/tune/selected.yaml")
    assert "# WARNING: beta search at chance" in text
    assert "# rule: highest validation accuracy" in text


# --------------------------------------------------------------------------------------------
# The report's conclusion


def _row(label, values, seeds=(0, 1)):
    return {"label": label, "mean": float(np.mean(values)), "std": float(np.std(values)),
            "values": values, "seeds": list(seeds), "runs_per_seed": len(values) // len(seeds)}


def test_conclusion_names_the_best_row_and_says_when_selmatch_loses():
    methods = {"random": _row("Random selection", [0.96, 0.97, 0.965, 0.962]),
               "mtt": _row("MTT", [0.93, 0.94, 0.935, 0.93]),
               "selmatch": _row("SelMatch (combined augmentation)", [0.90, 0.92, 0.91, 0.915])}
    found = conclusion(methods)
    assert found["best"] == "random" and found["second"] == "mtt"
    text = "\n".join(conclusion_lines(methods, found))
    assert "**Best row: Random selection**" in text and "beyond the noise" in text
    assert "**SelMatch (combined augmentation) is not the best row**" in text
    assert "rank 3 of 3" in text
    close = {"selmatch": _row("SelMatch (combined augmentation)", [0.95, 0.97, 0.96, 0.96]),
             "random": _row("Random selection", [0.955, 0.965, 0.95, 0.96])}
    text = "\n".join(conclusion_lines(close, conclusion(close)))
    assert "**Best row: SelMatch (combined augmentation)**" in text
    assert "within the noise" in text and "not told apart" in text
    assert "is the best row" in text and "is not the best row" not in text


def test_the_report_opens_with_its_conclusion(tmp_path):
    from launch.pipeline import run_pipeline

    cfg = prepare(tiny_config(tmp_path, seed=2, eval={"model": "convnet", "width": 16,
                                                      "runs": 2, "epochs": 4,
                                                      "methods": ["random", "selmatch"]},
                              distill={"iterations": 2}))
    url = run_pipeline(cfg, workers=0)
    report = storage.read_text(url)
    results = json.loads(storage.read_text(f"{tmp_path}/results.json"))
    best = results["conclusion"]["best"]
    assert report.index("## Conclusion") < report.index("## Results")
    assert f"**Best row: {results['methods'][best]['label']}**" in report
    if best != "selmatch":
        assert "**SelMatch (combined augmentation) is not the best row**" in report


# --------------------------------------------------------------------------------------------
# Flips follow the data


def _is_shift_of(out: torch.Tensor, row: torch.Tensor, fill: torch.Tensor, pad: int,
                 mirrored: bool) -> bool:
    src = row.flip(-1) if mirrored else row
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            if torch.equal(out, translate(src[None], torch.tensor([dy]), torch.tensor([dx]),
                                          fill)[0]):
                return True
    return False


@pytest.mark.parametrize("name,flips", [("digits", False), ("fashion_mnist", True),
                                        ("cifar10", True), ("mnist", False)])
def test_combined_augmentation_flips_real_rows_only_of_flip_invariant_data(name, flips):
    from distill.config_io import from_dict
    from distill.data import get_info

    cfg = from_dict({"data": {"name": name}}, check=False)
    info = get_info(name)
    real = real_augment(cfg, info)
    assert real.flip is flips
    c, h = info.image_shape[0], 8
    x = torch.randn(64, c, h, h, generator=torch.Generator().manual_seed(1))
    aug = build_augment("combined", real=real)
    out = aug(x, torch.Generator().manual_seed(2), dsa_mask=torch.zeros(64, dtype=torch.bool))
    pad = 1  # 8 px images: crop_pad(8)
    fill = real.fill.to(x)
    mirrored = [not _is_shift_of(out[i], x[i], fill, pad, False) for i in range(64)]
    if flips:
        assert any(mirrored)
        assert all(_is_shift_of(out[i], x[i], fill, pad, m) for i, m in enumerate(mirrored))
    else:
        assert not any(mirrored)  # every real row is a crop of itself, never of its mirror
    # the crop fills with black (pixel 0), not with 0 in the normalised space
    assert torch.allclose(real.fill, torch.tensor([-m / s for m, s in zip(info.mean, info.std)]))


def test_eval_flip_overrides_the_dataset_default():
    from distill.config_io import from_dict
    from distill.data import get_info

    cfg = from_dict({"data": {"name": "digits"}, "eval": {"flip": True, "crop_fill": "mean"}},
                    check=False)
    real = real_augment(cfg, get_info("digits"))
    assert real.flip is True and real.fill is None


# --------------------------------------------------------------------------------------------
# The α trial: one distillation path


def test_alpha_trial_resumed_logs_each_step_once(tmp_path):
    from helpers import killed_at
    from tune.main import alpha_trial_dir
    from distill.selection import Start
    from tune.trials import alpha_trial
    from test_metrics import scalars

    cfg = prepare(tiny_config(tmp_path, seed=3, metrics={"tensorboard": True},
                              eval={"model": "convnet", "width": 8, "epochs": 4},
                              tune={"alpha_iterations": 6, "beta_epoch_fraction": 0.5},
                              distill={"checkpoint_every": 2, "log_every": 1}))
    ds = load_configured(cfg.data)
    ctx = SearchContext(cfg, ds, load_scores(cfg.run_dir, "forgetting"))
    trial_dir = alpha_trial_dir(cfg, 0.5)
    with killed_at(5), pytest.raises(KeyboardInterrupt):
        alpha_trial(ctx, 0.5, start=Start("window", 0.2), trial_dir=trial_dir)
    ckpt = torch.load(f"{trial_dir}/checkpoints/selmatch.pt", weights_only=False)
    assert ckpt["iteration"] == 4
    out = alpha_trial(ctx, 0.5, start=Start("window", 0.2), trial_dir=trial_dir)
    logged = read_jsonl(f"{trial_dir}/logs/distill_selmatch.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    tb = scalars(tmp_path / "tune" / "alpha" / "trials" / "alpha_0.5000" / "tensorboard" /
                 "distill_selmatch")["loss"]
    assert [s for s, _ in tb] == [1, 2, 3, 4, 5, 6]
    assert out["final_loss"] == logged[-1]["loss"]
    # the trial's window lies inside the pool: no validation image is distilled or kept
    final = torch.load(f"{trial_dir}/synset/selmatch.pt", weights_only=False)
    assert not set(final["source_index"].tolist()) & set(ctx.val.tolist())


# --------------------------------------------------------------------------------------------
# Missing stages, all at once, with the user's arguments


def test_missing_stages_are_listed_at_once_with_the_users_arguments(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run")
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    args = ["--config", str(path), "--run_dir", str(tmp_path / "fresh"), "--distill.alpha", "0.25"]
    tail = " ".join(args)
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err
    assert "missing earlier stages (2) of selmatch distill" in err
    assert "- experts: missing: no experts in" in err
    assert f"- scores forgetting: missing: {tmp_path}/fresh/scores/forgetting.npy" in err
    assert err.index(f"selmatch experts {tail}") < err.index(f"selmatch scores {tail}")
    assert f"selmatch run {tail}" in err
    assert not (tmp_path / "fresh").exists()  # nothing written
    for command, n in (("scores", 1), ("tune", 2), ("window", 2), ("evaluate", 1)):
        assert main([command, *args]) == 2, command
        err = capsys.readouterr().err
        assert f"missing earlier stages ({n}) of selmatch {command}" in err, command
        assert tail in err, command
