"""Differentiable Siamese Augmentation (DSA) with explicit, replayable parameters.

Why explicit parameters: the matching step's exact gradient *replays* every inner step (docs/design.md
§2), so the augmentation of step k must be re-applied bit for bit during the backward pass, and a
global batch sharded across ranks must see the same transform row by row. Hence the split:

* :meth:`DSA.sample` draws a :class:`DSAParams` (one family per call, per-sample values) from a CPU
  ``torch.Generator``. The values live on CPU and are device independent: the same seed gives the
  same parameters on any machine.
* :meth:`DSA.apply` is a pure, differentiable function of (images, params): the same params on the
  same device give a bit-identical output. :meth:`DSAParams.slice` cuts the rows a shard or BN
  group owns.
* generators come from :func:`distill.rng.make_generator` (run seed, stream tag, iteration,
  step, ...), never from the clock.

Semantics follow DSA (Zhao & Bilen, 2021), re-implemented from its description:

* color: brightness ``x + b``, then saturation around the per-pixel channel mean, then contrast
  around the per-image mean. kornia's contrast is ``x * f`` and its saturation is HSV based, so
  those two are small custom ops; brightness is kornia's with ``clip_output=False`` (inputs are
  normalised and may be negative, clamping to [0, 1] would destroy them).
* crop: integer translation with zero fill, done by clamped gathers into a 1-pixel zero border:
  exact, differentiable, and no data-dependent padding.
* cutout: a zeroed square whose centre may sit near the edge so the square hangs off (unlike
  kornia's ``RandomErasing``, which keeps it inside).
* flip: per-sample horizontal flip.
* scale / rotate: DSA's normalised affine matrix (destination -> source, as ``F.affine_grid``),
  warped by kornia's ``homography_warp`` with ``normalized_coordinates=True, align_corners=True``
  and zero padding. That takes DSA's matrix as is, so it matches ``affine_grid`` + ``grid_sample``
  to ~1e-14 in float64 (~1e-5 in float32, grid arithmetic order); ``warp_affine`` would need a
  pixel-space source->destination matrix and two extra inversions. DSA samples the matrix entry,
  i.e. the *inverse* scale, uniformly in [1/ratio, ratio].

GPU note: forward passes are deterministic; the backward of ``grid_sample`` (scale, rotate) on CUDA
uses atomics, so input gradients can differ in the last bits between runs, and
``torch.use_deterministic_algorithms(True)`` rejects it on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness
from kornia.geometry.transform import hflip, homography_warp
from torch import Tensor

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")

# Per-family parameter names: what ``DSAParams.values`` must hold for a replay.
_VALUE_KEYS = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("dy", "dx"),
    "cutout": ("cy", "cx", "h", "w"),
    "flip": ("flip",),
    "scale": ("sx", "sy"),
    "rotate": ("angle",),
}

_PARAM_DTYPE = torch.float32  # explicit, so a changed global default dtype cannot change the draws


def _half_up(value: float) -> int:
    """Round half up like DSA's ``int(v + 0.5)`` (Python's ``round`` rounds half to even)."""
    return int(value + 0.5)


@dataclass
class DSAParams:
    """Everything needed to replay one DSA call: the family and per-sample values (dim 0 = row)."""

    family: str
    values: dict[str, Tensor]

    def __post_init__(self) -> None:
        if self.family not in _VALUE_KEYS:
            raise ValueError(f"unknown DSA family {self.family!r}; valid: {', '.join(FAMILIES)}")
        missing = set(_VALUE_KEYS[self.family]) - set(self.values)
        if missing:
            raise ValueError(f"DSA {self.family} params miss {sorted(missing)}")
        sizes = {v.shape[0] for v in self.values.values()}
        if len(sizes) != 1:
            raise ValueError(f"DSA params have inconsistent batch sizes {sorted(sizes)}")

    def __len__(self) -> int:
        return next(iter(self.values.values())).shape[0]

    def slice(self, start: int, stop: int) -> DSAParams:
        """Rows [start:stop]: the part of a global batch one rank or BN group applies."""
        return DSAParams(self.family, {k: v[start:stop] for k, v in self.values.items()})

    def take(self, rows: Tensor) -> DSAParams:
        """The rows at positions ``rows`` (a long tensor on the values' device): the share of a
        batch a rank applies when BN groups are split across ranks."""
        return DSAParams(self.family, {k: v.index_select(0, rows) for k, v in self.values.items()})


@dataclass(frozen=True, kw_only=True)
class DSAConfig:
    """DSA's hyper-parameters; the defaults are the DSA/MTT values."""

    families: tuple[str, ...] = FAMILIES
    """Families to choose from, one uniformly per call."""
    brightness: float = 1.0
    """Brightness shift is (u - 0.5) * brightness, u ~ U[0, 1)."""
    saturation: float = 2.0
    """Saturation factor is u * saturation."""
    contrast: float = 0.5
    """Contrast factor is u + contrast."""
    crop_ratio: float = 0.125
    """Largest translation as a fraction of the side (rounded half up to pixels)."""
    cutout_ratio: float = 0.5
    """Cutout square side as a fraction of the image side."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip per sample."""
    scale_ratio: float = 1.2
    """Affine scale entries ~ U[1/ratio, ratio] (the inverse zoom, as in DSA)."""
    rotate_degrees: float = 15.0
    """Rotation angle ~ U[-deg, deg]."""

    def __post_init__(self) -> None:
        problems = []
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            problems.append(f"families must be a non-empty subset of {', '.join(FAMILIES)}; "
                            f"got {tuple(self.families)!r}")
        for name in ("brightness", "saturation", "contrast", "crop_ratio", "cutout_ratio",
                     "rotate_degrees"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.flip_prob <= 1:
            problems.append(f"flip_prob must be in [0, 1], got {self.flip_prob!r}")
        if not self.scale_ratio >= 1:
            problems.append(f"scale_ratio must be >= 1, got {self.scale_ratio!r}")
        if problems:
            raise ValueError("invalid DSAConfig: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Parameter sampling (CPU generator only: device independent and reproducible)
# --------------------------------------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen, dtype=_PARAM_DTYPE) * (hi - lo) + lo


def _randint(lo: int, hi: int, n: int, gen: torch.Generator) -> Tensor:
    """Integers in [lo, hi] inclusive."""
    return torch.randint(lo, hi + 1, (n,), generator=gen, dtype=torch.int64)


def _sample_color(cfg: DSAConfig, n: int, size: tuple[int, int], g: torch.Generator) -> dict:
    b = (torch.rand(n, generator=g, dtype=_PARAM_DTYPE) - 0.5) * cfg.brightness
    s = torch.rand(n, generator=g, dtype=_PARAM_DTYPE) * cfg.saturation
    c = torch.rand(n, generator=g, dtype=_PARAM_DTYPE) + cfg.contrast
    return {"brightness": b, "saturation": s, "contrast": c}


def _sample_crop(cfg: DSAConfig, n: int, size: tuple[int, int], g: torch.Generator) -> dict:
    sh, sw = (_half_up(cfg.crop_ratio * side) for side in size)
    return {"dy": _randint(-sh, sh, n, g), "dx": _randint(-sw, sw, n, g)}


def _sample_cutout(cfg: DSAConfig, n: int, size: tuple[int, int], g: torch.Generator) -> dict:
    # Centres anywhere in the image (one extra position for even sides, as DSA), so the square
    # may hang off every edge.
    (h, w) = (_half_up(cfg.cutout_ratio * side) for side in size)
    cy = _randint(0, size[0] - h % 2, n, g)
    cx = _randint(0, size[1] - w % 2, n, g)
    return {"cy": cy, "cx": cx, "h": torch.full((n,), h, dtype=torch.int64),
            "w": torch.full((n,), w, dtype=torch.int64)}


def _sample_flip(cfg: DSAConfig, n: int, size: tuple[int, int], g: torch.Generator) -> dict:
    return {"flip": torch.rand(n, generator=g, dtype=_PARAM_DTYPE) < cfg.flip_prob}


def _sample_scale(cfg: DSAConfig, n: int, size: tuple[int, int], g: torch.Generator) -> dict:
    lo, hi = 1.0 / cfg.scale_ratio, cfg.scale_ratio
    return {"sx": _uniform(n, lo, hi, g), "sy": _uniform(n, lo, hi, g)}


def _sample_rotate(cfg: DSAConfig, n: int, size: tuple[int, int], g: torch.Generator) -> dict:
    limit = math.radians(cfg.rotate_degrees)
    return {"angle": _uniform(n, -limit, limit, g)}


# --------------------------------------------------------------------------------------------
# Pure transforms: (images, per-sample values on the images' device) -> images
# --------------------------------------------------------------------------------------------


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """[B] float values -> [B, 1, 1, 1] in the image's dtype and device."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _apply_color(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    x = adjust_brightness(x, _per_sample(v["brightness"], x), clip_output=False)
    mean = x.mean(dim=1, keepdim=True)  # per pixel, across channels (DSA's saturation)
    x = (x - mean) * _per_sample(v["saturation"], x) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # per image (DSA's contrast)
    return (x - mean) * _per_sample(v["contrast"], x) + mean


def translate(x: Tensor, dy: Tensor, dx: Tensor, fill: Tensor | None = None) -> Tensor:
    """Shift row b down by dy[b] and right by dx[b] pixels: out[i, j] = x[i-dy, j-dx], and the
    pixels shifted in take ``fill`` (per channel, [C]; None = 0 in the model input space).

    Gathers from a one-pixel border of ``fill`` with clamped indices, so any shift is exact (a
    pure copy, bit-identical on replay) and needs no padding that depends on the values.
    """
    b, c, h, w = x.shape
    dy, dx = dy.to(x.device).view(-1, 1), dx.to(x.device).view(-1, 1)
    rows = (torch.arange(h, device=x.device) - dy + 1).clamp(0, h + 1)  # [B, H] in padded coords
    cols = (torch.arange(w, device=x.device) - dx + 1).clamp(0, w + 1)  # [B, W]
    if fill is None:
        padded = F.pad(x, (1, 1, 1, 1))
    else:
        padded = fill.to(x).view(1, c, 1, 1).expand(b, c, h + 2, w + 2).clone()
        padded[:, :, 1:h + 1, 1:w + 1] = x
    out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def _apply_crop(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    return translate(x, v["dy"], v["dx"])


def _apply_cutout(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    _, _, h, w = x.shape
    cy, cx, sh, sw = (v[k].to(x.device).view(-1, 1) for k in ("cy", "cx", "h", "w"))
    top, left = cy - sh // 2, cx - sw // 2
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + sh)  # [B, H]
    in_cols = (cols >= left) & (cols < left + sw)  # [B, W]
    hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [B, 1, H, W]
    return torch.where(hole, torch.zeros((), dtype=x.dtype, device=x.device), x)


def flip_rows(x: Tensor, flip: Tensor) -> Tensor:
    """Horizontally flip the rows where ``flip`` is True (torch.where keeps it differentiable)."""
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), hflip(x), x)


def _apply_flip(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    return flip_rows(x, v["flip"])


def _warp(x: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Warp by the normalised dst->src matrix [[a, b, 0], [c, d, 0]] (DSA's ``affine_grid`` theta)."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    theta = torch.stack([a, b, zero, c, d, zero, zero, zero, one], dim=1).view(-1, 3, 3)
    return homography_warp(x, theta, (x.shape[2], x.shape[3]), mode="bilinear",
                           padding_mode="zeros", align_corners=True, normalized_coordinates=True)


def _apply_scale(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    sx, sy = (v[k].to(device=x.device, dtype=x.dtype) for k in ("sx", "sy"))
    zero = torch.zeros_like(sx)
    return _warp(x, sx, zero, zero, sy)


def _apply_rotate(x: Tensor, v: dict[str, Tensor]) -> Tensor:
    angle = v["angle"].to(device=x.device, dtype=x.dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return _warp(x, cos, sin, -sin, cos)


_SAMPLERS = {"color": _sample_color, "crop": _sample_crop, "cutout": _sample_cutout,
             "flip": _sample_flip, "scale": _sample_scale, "rotate": _sample_rotate}
_APPLIERS = {"color": _apply_color, "crop": _apply_crop, "cutout": _apply_cutout,
             "flip": _apply_flip, "scale": _apply_scale, "rotate": _apply_rotate}


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


class DSA:
    """Sample-then-apply DSA: ``sample`` draws replayable params, ``apply`` is a pure function."""

    def __init__(self, config: DSAConfig = DSAConfig()):
        self.config = config  # DSAConfig validates itself

    def sample(self, batch_size: int, image_size: tuple[int, int],
               generator: torch.Generator) -> DSAParams:
        """One family (uniform over ``config.families``), then per-sample values, all from
        ``generator`` (must be a CPU generator) so that a seed fixes the params everywhere."""
        if generator.device.type != "cpu":
            raise ValueError(f"DSA.sample needs a CPU generator (device independent), "
                             f"got one on {generator.device}")
        families = self.config.families
        family = families[int(torch.randint(len(families), (1,), generator=generator))]
        values = _SAMPLERS[family](self.config, batch_size, tuple(image_size), generator)
        return DSAParams(family, values)

    def apply(self, x: Tensor, params: DSAParams) -> Tensor:
        """Apply ``params`` to ``x`` [B, C, H, W]: differentiable in x, bit-identical on replay."""
        if x.dim() != 4:
            raise ValueError(f"DSA expects images [B, C, H, W], got shape {tuple(x.shape)}")
        if len(params) != x.shape[0]:
            raise ValueError(f"DSA params are for {len(params)} rows but the batch has "
                             f"{x.shape[0]}; slice the params with the rows (DSAParams.slice)")
        return _APPLIERS[params.family](x, params.values)

    def __call__(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, DSAParams]:
        params = self.sample(x.shape[0], (x.shape[2], x.shape[3]), generator)
        return self.apply(x, params), params


def crop_pad(size: int) -> int:
    """Padding of the random crop: 4 px, the paper's protocol for CIFAR (32 px) and Tiny ImageNet
    (64 px, App. B.3: "random cropping padded with 4 pixels"), and so also for 28-px MNIST-type
    images. Below 16 px it shrinks to size // 8 (1 px at 8x8): a 4-px shift would move half of an
    8x8 digit out of the frame."""
    return 4 if size >= 16 else max(1, size // 8)


def simple_augment(x: Tensor, generator: torch.Generator, *, flip: bool = True,
                   fill: Tensor | None = None) -> Tensor:
    """Random crop (:func:`crop_pad` pixels of padding, filled with ``fill``: see
    :func:`translate`) + horizontal flip with p = 0.5 when ``flip``, batched.

    A pad-p random crop is a uniform integer translation in [-p, p] per axis, so it reuses
    :func:`translate`; the per-sample values come from the CPU generator. The flip draws are
    made with ``flip`` off too, so the crops are the same with and without flips.
    """
    n = x.shape[0]
    pad = crop_pad(x.shape[-1])
    dy, dx = _randint(-pad, pad, n, generator), _randint(-pad, pad, n, generator)
    flips = torch.rand(n, generator=generator, dtype=_PARAM_DTYPE) < 0.5
    out = translate(x, dy, dx, fill)
    return flip_rows(out, flips) if flip else out


def combined_augment(x: Tensor, dsa_mask: Tensor, dsa: DSA, generator: torch.Generator, *,
                     flip: bool = True, fill: Tensor | None = None) -> Tensor:
    """The paper's evaluation augmentation: DSA on rows where ``dsa_mask`` is True (distilled
    images), crop (+ flip when ``flip``) on the others (selected real images, see
    :func:`simple_augment`); one batched call for each part, output rows in input order. The
    generator feeds DSA first, then the crop/flip."""
    mask = dsa_mask.to(device=x.device, dtype=torch.bool).view(-1)
    if mask.shape[0] != x.shape[0]:
        raise ValueError(f"dsa_mask has {mask.shape[0]} rows, images have {x.shape[0]}")
    dsa_rows = mask.nonzero().view(-1)
    simple_rows = (~mask).nonzero().view(-1)
    parts, order = [], []
    if dsa_rows.numel():
        parts.append(dsa(x[dsa_rows], generator)[0])
        order.append(dsa_rows)
    if simple_rows.numel():
        parts.append(simple_augment(x[simple_rows], generator, flip=flip, fill=fill))
        order.append(simple_rows)
    if not parts:
        return x
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(parts).index_select(0, inverse)


# --------------------------------------------------------------------------------------------
# Registry: name -> builder(DSAConfig) -> Augmentation
# --------------------------------------------------------------------------------------------


class Augmentation(Protocol):
    """What every registry entry builds: ``aug(x, generator, dsa_mask=None) -> images``."""

    def __call__(self, x: Tensor, generator: torch.Generator,
                 dsa_mask: Tensor | None = None) -> Tensor: ...


def _build_none(config: DSAConfig, real: RealAugment) -> Augmentation:
    return lambda x, generator, dsa_mask=None: x


def _build_dsa(config: DSAConfig, real: RealAugment) -> Augmentation:
    dsa = DSA(config)
    return lambda x, generator, dsa_mask=None: dsa(x, generator)[0]


def _build_simple(config: DSAConfig, real: RealAugment) -> Augmentation:
    return lambda x, generator, dsa_mask=None: simple_augment(x, generator, flip=real.flip,
                                                              fill=real.fill)


def _build_combined(config: DSAConfig, real: RealAugment) -> Augmentation:
    dsa = DSA(config)

    def combined(x: Tensor, generator: torch.Generator, dsa_mask: Tensor | None = None) -> Tensor:
        if dsa_mask is None:
            raise ValueError("the combined augmentation needs dsa_mask (True = distilled row)")
        return combined_augment(x, dsa_mask, dsa, generator, flip=real.flip, fill=real.fill)

    return combined


@dataclass(frozen=True)
class RealAugment:
    """How the crop + flip of real rows (``simple``, and the real part of ``combined``) runs:
    ``flip`` mirrors half of the rows (only for flip-invariant data: a mirrored digit is another
    shape), ``fill`` is the per-channel value of the pixels the crop shifts in (model input
    space; None = 0 there, the dataset's mean colour)."""

    flip: bool = True
    fill: Tensor | None = None


AUGMENTS: dict[str, Callable[[DSAConfig, RealAugment], Augmentation]] = {
    "none": _build_none, "dsa": _build_dsa, "simple": _build_simple, "combined": _build_combined,
}
"""Evaluation augmentations (``eval.augment``, a row's rule in distill/methods.py)."""

REAL_PARTS = ("simple", "combined")
"""The augmentations with a crop + flip part, which :class:`RealAugment` configures."""


def has_real_part(augment: str) -> bool:
    """Whether evaluation augmentation ``augment`` crops (and maybe flips) real rows: the one
    rule for where ``eval.flip`` and ``eval.crop_fill`` matter (records, stamps, reports)."""
    return augment in REAL_PARTS

TRAINING_AUGMENTS: dict[str, Callable[[DSAConfig], DSA | None]] = {
    "dsa": DSA, "none": lambda config: None,
}
"""What a training loop applies to each minibatch (``experts.augment``, ``distill.augment``):
DSA, whose parameters the loop draws and can replay, or nothing."""


def training_dsa(name: str, config: DSAConfig = DSAConfig()) -> DSA | None:
    """The DSA of a training loop's ``augment`` setting (None for none); an unknown name lists
    the valid ones."""
    if name not in TRAINING_AUGMENTS:
        raise ValueError(f"unknown training augmentation {name!r}; valid: "
                         f"{', '.join(TRAINING_AUGMENTS)}")
    return TRAINING_AUGMENTS[name](config)


def build_augment(name: str, config: DSAConfig = DSAConfig(),
                  real: RealAugment = RealAugment()) -> Augmentation:
    """Look up ``name`` in :data:`AUGMENTS`; an unknown name lists the valid ones."""
    if name not in AUGMENTS:
        raise ValueError(f"unknown augmentation {name!r}; valid: {', '.join(sorted(AUGMENTS))}")
    return AUGMENTS[name](config, real)
