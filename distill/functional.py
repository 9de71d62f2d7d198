"""The ConvNet student as a plain function of a flat parameter vector: the fast path's network.

The module-based forward (``models.functional_forward``) goes through
``torch.func.functional_call``: it swaps parameters into the module, updates BN running statistics
in place and returns through ``nn.Module`` hooks. That is fine for autograd but it is not a pure
function, which ``torch.func`` transforms and ``torch.compile`` want, and it costs ops. Here the
ConvNet is written out directly:

    θ.split(sizes) → views → [F.conv2d → norm → relu → avg_pool2d] × depth → F.linear

with no buffers at all (in train mode BN's output does not depend on its running statistics).
Before batch or instance norm the conv bias is left out: normalising with the data's own
statistics removes any per-channel shift exactly, so the function is the same and the bias's
gradient is exactly zero (the module-based path computes that zero as rounding noise).

**BN groups in one call.** Batch norm takes its statistics per BN group (docs/design.md §4): the rows
``[G·g, C, H, W]`` are viewed as ``[G, g, C, H, W]`` and normalised over (g, H, W) of each group,
so several groups of one step are computed in a single call with the same math as one call per
group. Instance and group norm normalise per sample and need no groups.

:func:`functional_convnet` reads the architecture off a :class:`~distill.models.ConvNet` module
and returns ``None`` for any other network, which then keeps the module-based path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models import ConvNet
from distill.params import ParamLayout


@dataclass(frozen=True)
class Block:
    """One ``conv → norm → relu → pool`` block: where its tensors sit in the split θ."""

    conv: int                  # index of the conv weight among θ's parts (bias follows)
    norm: str                  # "batch", "groupnorm" or "none"
    norm_groups: int           # GroupNorm's groups (unused otherwise)
    norm_affine: int | None    # index of the norm weight (bias follows); None = no parameters
    eps: float
    channels: int

    @property
    def bias_cancels(self) -> bool:
        """Batch norm and instance norm (one group per channel) remove a per-channel shift."""
        return self.norm == "batch" or (self.norm == "groupnorm"
                                        and self.norm_groups == self.channels)


@dataclass(frozen=True)
class FunctionalConvNet:
    """``forward(θ, x, groups)`` of a ConvNet, pure and differentiable to any order."""

    sizes: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    blocks: tuple[Block, ...]
    classifier: int            # index of the linear weight (bias follows)

    def forward(self, theta: Tensor, x: Tensor, groups: int = 1, team=None) -> Tensor:
        """Logits of ``x`` [G·g, C, H, W]; batch norm normalises each of ``groups`` row blocks.

        ``team`` (a :class:`~distill.runtime.Team`): the G groups are split across the team's
        ranks, each holding its share of every group's rows; batch-norm statistics are summed
        over the team (a differentiable all-reduce), so every rank normalises with the whole
        group's mean and variance.
        """
        parts = [p.view(s) for p, s in zip(theta.split(self.sizes), self.shapes)]
        h = x
        for blk in self.blocks:
            # A per-channel constant before batch or instance norm (normalised with the
            # statistics of the data itself) cancels exactly: skip the conv bias there. Its
            # gradient is then exactly 0, as in exact arithmetic, instead of rounding noise that
            # the replay's adjoint would carry through every step.
            bias = None if blk.bias_cancels else parts[blk.conv + 1]
            h = F.conv2d(h, parts[blk.conv], bias, padding=1)
            h = self._norm(h, blk, parts, groups, team)
            h = F.avg_pool2d(F.relu(h), 2)
        return F.linear(h.flatten(1), parts[self.classifier], parts[self.classifier + 1])

    @staticmethod
    def _norm(h: Tensor, blk: Block, parts: list[Tensor], groups: int, team) -> Tensor:
        w = b = None
        if blk.norm_affine is not None:
            w, b = parts[blk.norm_affine], parts[blk.norm_affine + 1]
        if blk.norm == "batch":
            n, c, hh, ww = h.shape
            hg = h.view(groups, n // groups, c, hh, ww)
            if team is None or team.size == 1:
                # the statistics accumulate in float64 (a no-op for float64 inputs): Inductor's
                # float32 reductions left the compiled path's error floor at 2x the eager one's
                # (tests/test_fast_precision.py; docs/matching.md, precision)
                var, mean = torch.var_mean(hg.double(), dim=(1, 3, 4), correction=0, keepdim=True)
                var, mean = var.to(h.dtype), mean.to(h.dtype)
            else:  # two passes (mean, then centred squares): no E[x²] − E[x]² cancellation
                count = (n // groups) * hh * ww * team.size
                mean = team.all_reduce_sum(hg.sum(dim=(1, 3, 4), keepdim=True)) / count
                var = team.all_reduce_sum((hg - mean).pow(2).sum(dim=(1, 3, 4), keepdim=True))
                var = var / count
            h = ((hg - mean) * torch.rsqrt(var + blk.eps)).view(n, c, hh, ww)
            return h * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) if w is not None else h
        if blk.norm == "groupnorm":
            return F.group_norm(h, blk.norm_groups, w, b, blk.eps)
        return h


def functional_convnet(model: nn.Module) -> FunctionalConvNet | None:
    """The pure form of ``model`` if it is a :class:`ConvNet` this module can express, else None.

    The parameter order is checked against ``ParamLayout.of(model)``, so a flat θ stored by the
    module-based code (expert trajectories) means the same thing here.
    """
    if not isinstance(model, ConvNet):
        return None
    layout = ParamLayout.of(model)
    index = {name: i for i, name in enumerate(layout.names)}
    blocks, layers = [], list(model.features)
    for i in range(0, len(layers), 4):
        conv, norm, relu, pool = layers[i:i + 4]
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
                and conv.padding == (1, 1) and conv.stride == (1, 1) and conv.bias is not None
                and isinstance(relu, nn.ReLU) and isinstance(pool, nn.AvgPool2d)):
            return None
        affine = None
        if isinstance(norm, nn.BatchNorm2d):
            kind, groups, eps = "batch", 0, norm.eps
            affine = index[f"features.{i + 1}.weight"] if norm.affine else None
        elif isinstance(norm, nn.GroupNorm):
            kind, groups, eps = "groupnorm", norm.num_groups, norm.eps
            affine = index[f"features.{i + 1}.weight"] if norm.affine else None
        elif isinstance(norm, nn.Identity):
            kind, groups, eps = "none", 0, 0.0
        else:
            return None
        blocks.append(Block(index[f"features.{i}.weight"], kind, groups, affine, float(eps),
                            conv.out_channels))
    net = FunctionalConvNet(layout.numels, layout.shapes, tuple(blocks),
                            index["classifier.weight"])
    expected = [i for blk in blocks for i in (blk.conv, blk.conv + 1)
                + ((blk.norm_affine, blk.norm_affine + 1) if blk.norm_affine is not None else ())]
    if expected + [net.classifier, net.classifier + 1] != list(range(len(layout.names))):
        return None  # parameters in an order this forward does not read
    return net
