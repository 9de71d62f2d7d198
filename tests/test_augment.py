"""DSA must be replayable bit for bit, differentiable, and mean what DSA means."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from distill.augment import (AUGMENTS, DSA, FAMILIES, DSAConfig, DSAParams, build_augment,
                             combined_augment, simple_augment, translate)
from distill.rng import make_generator


def _images(b=8, c=3, h=16, w=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g, dtype=dtype)


def _only(family: str, **kw) -> DSA:
    return DSA(DSAConfig(families=(family,), **kw))


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_is_bit_identical_and_seeds_differ(family):
    dsa, x = _only(family), _images()
    params = dsa.sample(8, (16, 16), make_generator(1, 2, 3))
    assert params.family == family
    assert torch.equal(dsa.apply(x, params), dsa.apply(x, params))
    # the same seed gives the same params, hence the same output
    again = dsa.sample(8, (16, 16), make_generator(1, 2, 3))
    assert torch.equal(dsa.apply(x, again), dsa.apply(x, params))
    other, _ = dsa(x, make_generator(1, 2, 4))
    assert not torch.equal(other, dsa.apply(x, params))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_input(family):
    x = _images().requires_grad_(True)
    y, _ = _only(family)(x, make_generator(5))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck_float64(family):
    dsa = _only(family)
    params = dsa.sample(2, (6, 6), make_generator(7))
    x = _images(2, 3, 6, 6, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, params), (x,))


@pytest.mark.parametrize("family", FAMILIES)
def test_slice_matches_full_batch(family):
    """Sharding contract: apply(full)[a:b] == apply(rows a:b, params.slice(a, b)), bit for bit."""
    dsa, x = _only(family), _images(b=10)
    params = dsa.sample(10, (16, 16), make_generator(11))
    full = dsa.apply(x, params)
    for a, b in ((0, 4), (3, 7), (9, 10)):
        assert torch.equal(full[a:b], dsa.apply(x[a:b], params.slice(a, b)))


def test_family_choice_uniform_and_deterministic():
    dsa = DSA()
    draw = lambda seed: [dsa.sample(2, (8, 8), make_generator(seed, i)).family  # noqa: E731
                         for i in range(1200)]
    first = draw(0)
    assert first == draw(0)
    counts = Counter(first)
    assert set(counts) == set(FAMILIES)
    assert all(120 <= n <= 280 for n in counts.values()), counts


def test_flip_prob_one_is_torch_flip():
    x = _images()
    y, _ = _only("flip", flip_prob=1.0)(x, make_generator(0))
    assert torch.equal(y, torch.flip(x, dims=[3]))


def test_crop_shift_moves_pixels_with_zero_fill():
    x = _images(b=2, c=1, h=5, w=5) + 10.0  # no zeros in the input
    params = DSAParams("crop", {"dy": torch.tensor([1, 0]), "dx": torch.tensor([0, -2])})
    y = _only("crop").apply(x, params)
    assert torch.equal(y[0, :, 1:], x[0, :, :-1]) and (y[0, :, 0] == 0).all()
    assert torch.equal(y[1, :, :, :-2], x[1, :, :, 2:]) and (y[1, :, :, -2:] == 0).all()


def test_crop_range_follows_ratio():
    params = _only("crop").sample(4000, (32, 32), make_generator(3))
    for k in ("dy", "dx"):
        assert set(params.values[k].tolist()) == set(range(-4, 5))


def test_cutout_zeroes_a_clipped_square():
    x = _images(b=3, c=2, h=8, w=8) + 10.0
    dsa = _only("cutout")  # side int(8 * 0.5 + 0.5) = 4, square rows [cy - 2, cy + 2)
    params = dsa.sample(3, (8, 8), make_generator(0))
    assert params.values["h"].tolist() == [4, 4, 4]
    params.values["cy"] = torch.tensor([4, 0, 8])
    params.values["cx"] = torch.tensor([4, 1, 7])
    zero = dsa.apply(x, params) == 0
    expected = torch.zeros(3, 8, 8, dtype=torch.bool)
    expected[0, 2:6, 2:6] = True   # inside
    expected[1, 0:2, 0:3] = True   # hangs off the top-left corner
    expected[2, 6:8, 5:8] = True   # hangs off the bottom-right corner
    assert torch.equal(zero, expected[:, None].expand_as(zero))


def test_cutout_centres_can_reach_past_the_edge():
    params = _only("cutout").sample(4000, (8, 8), make_generator(4))
    assert params.values["cy"].min() == 0 and params.values["cy"].max() == 8


def test_rotate_zero_and_scale_one_are_identity():
    # grid_sample's float32 grid rounding leaves a few ulp of |x|: use images in [0, 1) here
    n = 8
    rot = DSAParams("rotate", {"angle": torch.zeros(n)})
    sc = DSAParams("scale", {"sx": torch.ones(n), "sy": torch.ones(n)})
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=dtype)
        assert (DSA().apply(x, rot) - x).abs().max() < tol
        assert (DSA().apply(x, sc) - x).abs().max() < tol


def test_warps_match_affine_grid_reference():
    """scale/rotate mean DSA's theta fed to affine_grid + grid_sample (float64)."""
    x = _images(b=4, dtype=torch.float64)
    for family in ("scale", "rotate"):
        params = _only(family).sample(4, (16, 16), make_generator(9))
        v = {k: t.double() for k, t in params.values.items()}
        z = torch.zeros(4, dtype=torch.float64)
        if family == "scale":
            theta = torch.stack([v["sx"], z, z, z, v["sy"], z], 1).view(4, 2, 3)
        else:
            c, s = v["angle"].cos(), v["angle"].sin()
            theta = torch.stack([c, s, z, -s, c, z], 1).view(4, 2, 3)
        ref = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=True),
                            align_corners=True)
        assert (DSA().apply(x, params) - ref).abs().max() < 1e-10


def test_warp_ranges():
    scale = _only("scale").sample(2000, (8, 8), make_generator(1)).values["sx"]
    assert scale.min() >= 1 / 1.2 and scale.max() <= 1.2
    angle = _only("rotate").sample(2000, (8, 8), make_generator(1)).values["angle"]
    assert angle.abs().max() <= math.radians(15) and angle.abs().max() > math.radians(14)


def test_color_identity_at_midpoint():
    cfg, n = DSAConfig(), 8
    u = torch.full((n,), 0.5)
    params = DSAParams("color", {"brightness": (u - 0.5) * cfg.brightness,
                                 "saturation": u * cfg.saturation, "contrast": u + cfg.contrast})
    x = _images()
    assert (DSA(cfg).apply(x, params) - x).abs().max() < 1e-6


def test_color_semantics_no_clamp():
    x = _images(b=2, c=3, h=4, w=4) * 3  # normalised images go well outside [0, 1]
    b, s, c = torch.tensor([0.3, -0.2]), torch.tensor([1.5, 0.2]), torch.tensor([0.7, 1.4])
    y = DSA().apply(x, DSAParams("color", {"brightness": b, "saturation": s, "contrast": c}))
    r = x + b.view(-1, 1, 1, 1)
    m = r.mean(1, keepdim=True)
    r = (r - m) * s.view(-1, 1, 1, 1) + m
    m = r.mean((1, 2, 3), keepdim=True)
    r = (r - m) * c.view(-1, 1, 1, 1) + m
    assert torch.allclose(y, r, atol=1e-6) and y.min() < -1


def test_params_validation():
    params = DSA().sample(5, (8, 8), make_generator(2))
    with pytest.raises(ValueError, match="valid"):
        DSAParams("blur", {})
    with pytest.raises(ValueError, match="rows"):
        DSA().apply(_images(b=4), params)


def test_config_validation_lists_valid_families():
    with pytest.raises(ValueError, match="color, crop"):
        DSAConfig(families=("color", "blur"))
    with pytest.raises(ValueError, match="scale_ratio"):
        DSAConfig(scale_ratio=0.5)


def _crop_flip_candidates(row: torch.Tensor) -> torch.Tensor:
    """Every pad-4 crop of row and of its mirror: [2 * 81, C, H, W]."""
    shifts = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    dy = torch.tensor([s[0] for s in shifts])
    dx = torch.tensor([s[1] for s in shifts])
    both = torch.cat([row.expand(len(shifts), -1, -1, -1),
                      torch.flip(row, dims=[2]).expand(len(shifts), -1, -1, -1)])
    return translate(both, torch.cat([dy, dy]), torch.cat([dx, dx]))


def _is_crop_flip(out_row: torch.Tensor, in_row: torch.Tensor) -> bool:
    cands = _crop_flip_candidates(in_row)
    return bool((cands == out_row).flatten(1).all(1).any())


def test_simple_augment_shape_determinism_and_semantics():
    x = _images(b=6, c=2, h=8, w=8) + 10.0
    y = simple_augment(x, make_generator(3))
    assert y.shape == x.shape
    assert torch.equal(y, simple_augment(x, make_generator(3)))
    assert not torch.equal(y, simple_augment(x, make_generator(4)))
    assert all(_is_crop_flip(y[i], x[i]) for i in range(6))


def test_translate_candidates_are_brute_force_shifts():
    row = _images(b=1, c=1, h=8, w=8)
    shifted = torch.zeros_like(row)
    shifted[..., 3:, :6] = row[..., :5, 2:]  # down 3, left 2, zero fill
    assert torch.equal(translate(row, torch.tensor([3]), torch.tensor([-2])), shifted)


def test_combined_augment_rows_in_order():
    x = _images(b=8, c=3, h=8, w=8) + 10.0
    mask = torch.tensor([True, False, False, True, False, True, True, False])
    dsa = _only("color")
    y = combined_augment(x, mask, dsa, make_generator(0))
    assert y.shape == x.shape
    assert torch.equal(y, combined_augment(x, mask, dsa, make_generator(0)))
    for i in range(8):
        assert _is_crop_flip(y[i], x[i]) == (not mask[i].item()), i
    # DSA rows equal one DSA call on the masked rows (the generator feeds DSA first)
    expected, _ = dsa(x[mask], make_generator(0))
    assert torch.equal(y[mask], expected)


def test_registry():
    assert set(AUGMENTS) == {"none", "dsa", "simple", "combined"}
    x, mask = _images(b=4, h=8, w=8), torch.tensor([True, False, True, False])
    for name in AUGMENTS:
        y = build_augment(name)(x, make_generator(1), dsa_mask=mask)
        assert y.shape == x.shape
    assert torch.equal(build_augment("none")(x, make_generator(1)), x)
    with pytest.raises(ValueError, match="combined, dsa, none, simple"):
        build_augment("autoaugment")
    with pytest.raises(ValueError, match="dsa_mask"):
        build_augment("combined")(x, make_generator(1))


def test_crop_padding_is_4_px_at_32_and_64_and_smaller_for_8x8_digits():
    """App. B.3: random crop padded with 4 pixels, for CIFAR (32) and Tiny ImageNet (64); an 8x8
    digit gets 1 px (4 px would shift half of it out of the frame)."""
    from distill.augment import crop_pad, simple_augment

    assert [crop_pad(s) for s in (8, 28, 32, 64)] == [1, 4, 4, 4]
    # the shift actually applied at 64 px spans [-4, 4] rows (flips mirror columns 28..36 to 27..35)
    x = torch.zeros(400, 1, 64, 64)
    x[:, :, 32, 32] = 1.0
    out = simple_augment(x, torch.Generator().manual_seed(0))
    rows, cols = (out[:, 0] > 0.5).nonzero()[:, 1:].T
    assert len(rows) == 400 and (rows.min(), rows.max()) == (28, 36)
    assert (cols.min(), cols.max()) == (27, 36)
    # on 8x8 images every output is a shift of at most 1 px (or its mirror), never 2
    x = _images(b=64, c=1, h=8, w=8) + 10.0
    y = simple_augment(x, make_generator(9))
    for i in range(64):
        cands = [translate(x[i:i + 1], torch.tensor([dy]), torch.tensor([dx]))[0]
                 for dy in range(-1, 2) for dx in range(-1, 2)]
        cands += [c.flip(-1) for c in cands]
        assert any(torch.equal(y[i], c) for c in cands)


def test_training_loops_take_dsa_or_nothing():
    from distill.augment import TRAINING_AUGMENTS, training_dsa

    assert isinstance(training_dsa("dsa"), DSA) and training_dsa("none") is None
    assert set(TRAINING_AUGMENTS) == {"dsa", "none"} and set(AUGMENTS) >= set(TRAINING_AUGMENTS)
    with pytest.raises(ValueError, match="unknown training augmentation 'simple'; valid: dsa, none"):
        training_dsa("simple")
