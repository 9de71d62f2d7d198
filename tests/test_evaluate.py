"""Evaluation: epoch rule, radius/coverage by hand, augmentation routing, digits accuracy,
Reference (EL2N split, features), determinism and the result record."""

from __future__ import annotations

import json
import math

import pytest
import torch

from distill import augment as augment_mod
from distill import evaluate as ev
from distill.data import load_dataset
from distill.evaluate import (
    EvalResult,
    Reference,
    coverage,
    eval_epochs,
    evaluate_images,
    nn_radius,
    train_network,
)
from distill.experts import el2n_scores
from distill.models import build_model
from helpers import protocol


def run_config(**eval_fields):
    """A run config evaluating with a ConvNet and these ``eval.*`` fields (the rest: defaults)."""
    from distill.config_io import from_dict

    return from_dict({"eval": {"model": "convnet", **eval_fields}})

# The default-width ConvNet costs ~0.1 s per step of 128 digits on 2 idle cores (12 steps an
# epoch). Without augmentation it reaches ~96% after 2 epochs, ~98% after 3 (crop with pad 4
# is harsh on 8x8 images: 83% after 8 epochs).
EXPERT_EPOCHS = 2
EVAL_EPOCHS = 2


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic")  # 3 classes x 20 train, 10 test, 1x8x8


@pytest.fixture(scope="module")
def expert(digits):
    """A ConvNet trained on the full digits training set (the Reference's expert)."""
    return train_network(digits.x_train, digits.y_train, num_classes=10, seed=0,
                         protocol=protocol(digits.info, epochs=EXPERT_EPOCHS, augment="none"))


@pytest.fixture(scope="module")
def reference(expert, digits):
    return Reference.from_expert(expert, digits)


# --------------------------------------------------------------------------------------------
# Epoch rule and distances


def test_eval_epochs_paper_values():
    assert [eval_epochs(r) for r in (0.05, 0.10, 0.20, 0.30)] == [1000, 500, 250, 167]
    assert eval_epochs(1.0) == 50
    assert eval_epochs(0.5, full_epochs=100, budget=1.0) == 200


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, math.nan, True])
def test_eval_epochs_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        eval_epochs(ratio)


def test_nn_radius_points_on_a_line():
    # 0, 1, 3, 7: nearest other point at distance 1, 1, 2, 4 -> mean 8 / 4 = 2.0
    f = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert nn_radius(f) == pytest.approx(2.0)
    # a duplicate is a neighbour at distance 0 (only the point itself is excluded): 0, 0, 5 -> 5/3
    assert nn_radius(torch.tensor([[0.0], [0.0], [5.0]])) == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="n >= 2"):
        nn_radius(torch.tensor([[1.0]]))


def test_coverage_hand_example():
    syn = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    test = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 0.0], [10.0, 3.0], [7.0, 4.0]])
    # nearest synthetic distances: 1, 2, 5, 3, 5 (|(7,4)-(10,0)| = 5); radius 3 covers
    # 1, 2 and 3 (inclusive) -> 3 / 5 = 0.6; radius 0.5 covers none; radius 5 covers all.
    assert coverage(syn, test, 3.0) == pytest.approx(0.6)
    assert coverage(syn, test, 0.5) == 0.0
    assert coverage(syn, test, 5.0) == 1.0
    with pytest.raises(ValueError, match="feature sizes differ"):
        coverage(syn[:, :1], test, 3.0)
    with pytest.raises(ValueError, match="radius"):
        coverage(syn, test, -1.0)


def test_chunked_distances_match_unchunked(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    f, g = torch.randn(50, 4, generator=gen), torch.randn(30, 4, generator=gen)
    full_r, full_c = nn_radius(f), coverage(f, g, 1.0)
    monkeypatch.setattr(ev, "_CHUNK", 7)
    assert nn_radius(f) == pytest.approx(full_r, rel=1e-6)
    assert coverage(f, g, 1.0) == full_c


# --------------------------------------------------------------------------------------------
# Training: augmentation routing, validation, determinism


def _record_augment_rows(monkeypatch) -> dict[str, list[torch.Tensor]]:
    """Record the rows that reach DSA and the crop+flip augmentation (then run the real ones)."""
    seen: dict[str, list[torch.Tensor]] = {"dsa": [], "simple": []}
    real_dsa_call, real_simple = augment_mod.DSA.__call__, augment_mod.simple_augment

    def dsa_call(self, x, generator):
        seen["dsa"].append(x.detach().clone())
        return real_dsa_call(self, x, generator)

    def simple(x, generator, **kw):
        seen["simple"].append(x.detach().clone())
        return real_simple(x, generator, **kw)

    monkeypatch.setattr(augment_mod.DSA, "__call__", dsa_call)
    monkeypatch.setattr(augment_mod, "simple_augment", simple)
    return seen


def _source_rows(rows: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Index in `images` of every recorded row (each must equal exactly one source image)."""
    if not rows:
        return torch.empty(0, dtype=torch.long)
    x = torch.cat(rows).flatten(1)
    match = (x[:, None, :] == images.flatten(1)[None]).all(-1)
    assert (match.sum(1) == 1).all(), "an augmented row is not an untouched source image"
    return match.float().argmax(1)


def test_combined_augment_routes_rows_by_is_distilled(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(24, 1, 8, 8, generator=gen)
    labels = torch.arange(24) % 3
    is_distilled = torch.rand(24, generator=gen) < 0.5
    seen = _record_augment_rows(monkeypatch)
    train_network(images, labels, num_classes=3, is_distilled=is_distilled, seed=1,
                  protocol=protocol(epochs=2, batch_size=8, augment="combined"))
    to_dsa, to_simple = _source_rows(seen["dsa"], images), _source_rows(seen["simple"], images)
    # every row of every step went to exactly one of the two, chosen by its own is_distilled
    assert len(to_dsa) + len(to_simple) == 2 * 24
    assert is_distilled[to_dsa].all() and len(to_dsa) == 2 * int(is_distilled.sum())
    assert (~is_distilled[to_simple]).all() and len(to_simple) == 2 * int((~is_distilled).sum())


def test_combined_without_mask_is_crop_flip_only(monkeypatch):
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = _record_augment_rows(monkeypatch)
    train_network(images, torch.arange(16) % 2, num_classes=2, is_distilled=None,
                  protocol=protocol(epochs=1, batch_size=8, augment="combined"))
    assert not seen["dsa"] and len(_source_rows(seen["simple"], images)) == 16


def test_train_network_validates_inputs():
    x, y = torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="unknown augment 'bogus'; valid: combined, dsa"):
        train_network(x, y, num_classes=2, protocol=protocol(epochs=1, augment="bogus"))
    with pytest.raises(ValueError, match="is_distilled must be \\[N\\]") as err:
        train_network(x, y, num_classes=2, protocol=protocol(epochs=0),
                      is_distilled=torch.zeros(3, dtype=torch.bool))
    assert "epochs must be an integer >= 1, got 0" in str(err.value)  # all problems at once
    with pytest.raises(ValueError, match="labels must be in 0..0"):
        train_network(x, y, num_classes=1, protocol=protocol(epochs=1))
    with pytest.raises(ValueError, match="unknown model"):
        train_network(x, y, num_classes=2, protocol=protocol(epochs=1, model="nope"))


def test_last_single_sample_joins_previous_batch():
    assert [len(b) for b in ev._batches(torch.arange(9), 4)] == [4, 5]
    assert [len(b) for b in ev._batches(torch.arange(8), 4)] == [4, 4]
    assert [len(b) for b in ev._batches(torch.arange(1), 4)] == [1]


def test_same_seed_same_network_other_seed_differs(synthetic):
    kw = dict(num_classes=3, is_distilled=torch.arange(60) % 2 == 0,
              protocol=protocol(synthetic.info, epochs=2, batch_size=32, augment="combined"))
    a = train_network(synthetic.x_train, synthetic.y_train, seed=5, **kw)
    b = train_network(synthetic.x_train, synthetic.y_train, seed=5, **kw)
    c = train_network(synthetic.x_train, synthetic.y_train, seed=6, **kw)
    assert not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# --------------------------------------------------------------------------------------------
# Digits: accuracy, Reference


def test_full_digits_training_set_reaches_90_percent(digits, reference):
    cfg = run_config(epochs=EVAL_EPOCHS, runs=1)
    result = evaluate_images(cfg, digits, digits.x_train, digits.y_train, augment="none",
                             seed=0, reference=reference, progress=False)
    assert result.accuracies[0] > 0.90
    assert result.easy_acc > result.hard_acc
    assert result.mean == pytest.approx((result.easy_acc + result.hard_acc) / 2, abs=0.01)
    assert 0.0 < result.coverage <= 1.0


def test_reference_easy_half_features_and_radius(expert, digits, reference):
    n_test = len(digits.y_test)
    assert reference.easy.dtype == torch.bool and int(reference.easy.sum()) == n_test // 2
    el2n = el2n_scores(expert, digits.x_test, digits.y_test, 10)
    assert el2n[reference.easy].max() <= el2n[~reference.easy].min()
    # features = input of the last Linear: ConvNet's flattened conv features
    with torch.no_grad():
        manual = expert.features(digits.x_test[:5]).flatten(1)
    torch.testing.assert_close(reference.feature_fn(digits.x_test[:5]), manual)
    torch.testing.assert_close(reference.test_features[:5], manual)
    assert reference.radius == pytest.approx(nn_radius(reference.feature_fn(digits.x_train)))
    train_features = reference.feature_fn(digits.x_train)
    few = torch.randperm(len(digits.y_train), generator=torch.Generator().manual_seed(0))[:10]
    full_cov = coverage(train_features, reference.test_features, reference.radius)
    few_cov = coverage(train_features[few], reference.test_features, reference.radius)
    assert full_cov > few_cov
    sparse = Reference.from_expert(expert, digits, max_train=200)
    assert sparse.radius > reference.radius  # fewer points, farther nearest neighbours


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("vgg11", 512)])
def test_reference_hooks_last_linear_of_other_networks(synthetic, name, dim):
    net = build_model(name, in_channels=1, num_classes=3, image_size=8).eval()
    ref = Reference.from_expert(net, synthetic, batch_size=16)
    assert ref.test_features.shape == (30, dim) and int(ref.easy.sum()) == 15
    assert ref.radius > 0
    assert not net.training
    assert all(not m._forward_pre_hooks for m in net.modules())  # hook removed


# --------------------------------------------------------------------------------------------
# evaluate_images / evaluate_config


def test_evaluate_images_result_fields_and_determinism(synthetic):
    cfg = run_config(epochs=2, runs=2, batch_size=32)
    kw = dict(augment="dsa", seed=3, progress=False)
    result = evaluate_images(cfg, synthetic, synthetic.x_train, synthetic.y_train, **kw)
    again = evaluate_images(cfg, synthetic, synthetic.x_train, synthetic.y_train, **kw)
    assert result.accuracies == again.accuracies
    assert len(result.accuracies) == 2 and all(0 <= a <= 1 for a in result.accuracies)
    n = len(synthetic.y_test)  # each accuracy is a count of test samples
    assert all(abs(a * n - round(a * n)) < 1e-4 for a in result.accuracies)
    assert result.mean == pytest.approx(sum(result.accuracies) / 2)
    assert result.std == pytest.approx(abs(result.accuracies[0] - result.accuracies[1]) / 2)
    assert result.easy_acc is None and result.hard_acc is None and result.coverage is None
    assert (result.epochs, result.runs, result.model, result.augment, result.n_images) == (
        2, 2, "convnet", "dsa", 60)
    data = json.loads(json.dumps(result.to_dict()))
    assert EvalResult.from_dict(data) == result


def test_evaluate_images_rejects_foreign_reference(synthetic, reference):
    with pytest.raises(ValueError, match="build the Reference on this dataset"):
        evaluate_images(run_config(epochs=1, runs=1), synthetic, synthetic.x_train,
                        synthetic.y_train, reference=reference, progress=False)


def test_evaluate_sets_takes_every_setting_from_the_config(monkeypatch, synthetic):
    """The pipeline's one evaluation path fills the network, optimiser, epochs, runs, seed and
    the crop + flip of real rows from the run config (the searches call the same run_set)."""
    import dataclasses

    from distill.config_io import from_dict

    calls = []
    monkeypatch.setattr(ev, "run_correct", lambda *a, **kw: (calls.append(kw),
                                                               torch.zeros(30, dtype=bool))[1])
    cfg = from_dict({"data": {"name": "synthetic"}, "model": {"width": 16, "depth": 2},
                     "eval": {"model": "convnet", "runs": 4, "lr": 0.05, "momentum": 0.8,
                              "weight_decay": 1e-4, "batch_size": 64, "augment": "simple"},
                     "seed": 7}, check=False)
    images = synthetic.x_train[:18]  # 18 / 60 = 30% of the training set -> 167 epochs
    sets = {"a": ev.ImageSet(images, synthetic.y_train[:18], None, augment="simple")}
    res = ev.evaluate_sets(cfg, synthetic, sets, progress=False)["a"]
    assert len(calls) == 4 and [c["run"] for c in calls] == [0, 1, 2, 3]
    first, p = calls[0], calls[0]["protocol"]
    assert (p.model, p.epochs, p.augment, first["seed"]) == ("convnet", 167, "simple", 7)
    assert (p.lr, p.momentum, p.weight_decay, p.batch_size) == (0.05, 0.8, 1e-4, 64)
    assert (p.width, p.depth, p.norm) == (16, 2, "batch")  # the model's
    assert p.real.flip is False  # synthetic data is not flip-invariant
    assert torch.allclose(p.real.fill, torch.tensor([-m / s for m, s in zip(
        synthetic.info.mean, synthetic.info.std)]))  # black: pixel 0
    assert (res.width, res.depth, res.flip, res.crop_fill) == (16, 2, False, "black")
    calls.clear()
    other = dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, model="resnet18", epochs=11, flip=True, crop_fill="mean"))
    res = ev.evaluate_sets(other, synthetic, {"a": dataclasses.replace(sets["a"], augment="dsa")},
                           progress=False)["a"]
    p = calls[0]["protocol"]
    assert p.epochs == 11 and (p.width, p.norm) == (128, "batch")
    assert p.real.flip is True and p.real.fill is None
    assert res.flip is None and res.crop_fill is None  # DSA has no crop + flip part
