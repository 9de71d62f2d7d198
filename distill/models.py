"""Networks: a registry of what the pipeline trains, and their batched inference.

A registry (`MODELS`, `build_model`) of the networks the pipeline trains: the ConvNet that
MTT/SelMatch use as expert and student, and the ResNet/VGG evaluation networks. A deeper ConvNet
is `depth=4`, not a new name. `eval_outputs` is the one batched eval-mode forward
loop (accuracy, EL2N, predictions, features). A network's parameters as one flat vector
(`ParamLayout`, `functional_forward`) live in distill/params.py.

Models never wrap themselves in DataParallel and never touch the RNG state beyond PyTorch's
default initialisation, so `torch.manual_seed(s)` before `build_model` fixes the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.checks import int_problem

__all__ = [
    "MODELS", "NORMS", "ConvNet", "ResNet", "VGG", "build_model", "eval_outputs", "make_norm",
    "max_convnet_depth", "model_names",
]  # fmt: skip

NORMS = ("batch", "instance", "group", "none")


# --------------------------------------------------------------------------------------------
# Normalisation factory


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")


def _group_count(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of `channels` that is at most `max_groups` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def make_norm(norm: str, channels: int) -> nn.Module:
    """One normalisation layer over `channels` feature maps.

    "batch" is BatchNorm2d: in train mode it normalises with the minibatch's statistics, which the
    matching step relies on (and which BN groups make rank-independent). "instance" is
    GroupNorm(C, C) with affine weights, the way MTT implements instance norm (nn.InstanceNorm2d
    has no affine parameters by default and keeps running stats optionally; GroupNorm is
    unambiguous). "group" uses the largest divisor of C not above 32. "none" is the identity.
    """
    _check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(_group_count(channels), channels, affine=True)
    return nn.Identity()


# --------------------------------------------------------------------------------------------
# ConvNet (MTT / SelMatch expert and student)


def max_convnet_depth(image_size: int) -> int:
    """How many 2×2 average pools an image of this size survives (floor(log2(size)))."""
    return max(int(image_size).bit_length() - 1, 0)


def default_convnet_depth(image_size: int) -> int:
    """MTT's choice: depth 3 up to 32 px, one more block per doubling (4 at 64 px, 5 at 128 px)."""
    depth, size = 3, 32
    while image_size > size:
        depth, size = depth + 1, size * 2
    return depth


class ConvNet(nn.Module):
    """`depth` × [Conv3×3(width) → norm → ReLU → AvgPool2d(2)] → flatten → Linear.

    The feature size after the blocks is computed arithmetically (each pool floors: 28 → 14 → 7
    → 3), so odd sizes such as 28 px work without a hard-coded table.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        _check_norm(norm)
        depth = default_convnet_depth(image_size) if depth is None else depth
        max_depth = max_convnet_depth(image_size)
        if not isinstance(depth, int) or not 1 <= depth <= max_depth:
            raise ValueError(
                f"ConvNet depth {depth} does not fit {image_size}x{image_size} images: each block "
                f"halves the size, so depth must be in [1, {max_depth}]"
            )
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                make_norm(norm, width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            channels, size = width, size // 2
        self.depth = depth
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


# --------------------------------------------------------------------------------------------
# ResNet (evaluation network, CIFAR style)


def _conv(cin: int, cout: int, kernel: int, stride: int, norm: str) -> nn.Conv2d:
    """Conv without bias when a norm follows (the norm's shift makes a bias redundant)."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=norm == "none")


def _shortcut(cin: int, cout: int, stride: int, norm: str) -> nn.Module:
    """Identity when shapes agree, else a strided 1×1 projection (ResNet option B)."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(_conv(cin, cout, 1, stride, norm), make_norm(norm, cout))


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride, norm)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = _conv(planes, planes, 3, 1, norm)
        self.norm2 = make_norm(norm, planes)
        self.shortcut = _shortcut(cin, planes, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (carries the stride, as in ResNet v1.5) → 1×1 expand ×4 (ResNet-50)"""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = _conv(cin, planes, 1, 1, norm)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = _conv(planes, planes, 3, stride, norm)
        self.norm2 = make_norm(norm, planes)
        self.conv3 = _conv(planes, cout, 1, 1, norm)
        self.norm3 = make_norm(norm, cout)
        self.shortcut = _shortcut(cin, cout, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem without max-pool, stages of 64/128/256/512 planes.

    Images up to 32 px keep a stride-1 stem (the paper's evaluation protocol, App. B.3). Larger
    images (Tiny ImageNet, 64 px) get a stride-2 stem so that the stages see 32×32 maps and the
    compute per image stays comparable to CIFAR, the usual Tiny ImageNet protocol for dataset
    distillation. Adaptive average pooling makes any size work, down to 8×8 digits whose maps
    reach 1×1 before the last stage.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks: tuple[int, int, int, int],
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        _check_norm(norm)
        stem_stride = 1 if image_size <= 32 else 2
        self.stem = nn.Sequential(
            _conv(in_channels, 64, 3, stem_stride, norm), make_norm(norm, 64), nn.ReLU()
        )
        cin, stages = 64, []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(block(cin, planes, stride, norm))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --------------------------------------------------------------------------------------------
# VGG (evaluation network, CIFAR style)

VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"),
}  # fmt: skip


class VGG(nn.Module):
    """VGG with normalisation after every conv and a single Linear(512) classifier (CIFAR style).

    A max-pool that would shrink the maps below 1×1 is skipped (8×8 digits keep three of the five
    pools, 28 px keeps four), so the network depth is the same for every dataset. The maps are
    average-pooled to 1×1 before the classifier: a no-op for 32 px, and it keeps the classifier at
    512 inputs for 64 px images, whose maps end at 2×2.
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        *,
        in_channels: int,
        num_classes: int,
        image_size: int,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        _check_norm(norm)
        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for item in cfg:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    size //= 2
                continue
            cout = int(item)
            layers += [
                nn.Conv2d(cin, cout, kernel_size=3, padding=1),
                make_norm(norm, cout),
                nn.ReLU(inplace=True),
            ]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))


# --------------------------------------------------------------------------------------------
# Registry


def _resnet(
    block: type[BasicBlock] | type[Bottleneck], blocks: tuple[int, int, int, int], *,
    in_channels: int, num_classes: int, image_size: int, width: int, depth: int | None, norm: str,
) -> ResNet:  # fmt: skip
    """ResNets have fixed widths and depths: `width` and `depth` are ConvNet-only and ignored."""
    del width, depth
    return ResNet(
        block, blocks, in_channels=in_channels, num_classes=num_classes,
        image_size=image_size, norm=norm,
    )  # fmt: skip


def _vgg(
    name: str, *, in_channels: int, num_classes: int, image_size: int, width: int,
    depth: int | None, norm: str,
) -> VGG:  # fmt: skip
    """VGG widths and depths come from the config: `width` and `depth` are ignored."""
    del width, depth
    return VGG(
        VGG_CONFIGS[name], in_channels=in_channels, num_classes=num_classes,
        image_size=image_size, norm=norm,
    )  # fmt: skip


MODELS: dict[str, Callable[..., nn.Module]] = {
    "convnet": ConvNet,
    "resnet18": partial(_resnet, BasicBlock, (2, 2, 2, 2)),
    "resnet34": partial(_resnet, BasicBlock, (3, 4, 6, 3)),
    "resnet50": partial(_resnet, Bottleneck, (3, 4, 6, 3)),
    "vgg11": partial(_vgg, "vgg11"),
    "vgg16": partial(_vgg, "vgg16"),
}
"""Name → builder. Every builder takes the keyword arguments of `build_model` after `name`."""


def register_network(name: str, builder: Callable[..., nn.Module], *,
                     replace_existing: bool = False) -> None:
    """Add a network to :data:`MODELS` (in this process): ``builder(in_channels=, num_classes=,
    image_size=, width=, depth=, norm=)`` returns an ``nn.Module`` mapping images to logits, its
    last layer an ``nn.Linear`` (evaluation's features hook it). The matching step needs batch
    norm without running statistics updates through torch.func, which ``functional_forward``
    provides for any module; the compiled fast path is the ConvNet's alone."""
    if name in MODELS and not replace_existing:
        raise ValueError(f"network {name!r} is registered already (replace_existing=True "
                         f"replaces it); registered: {', '.join(model_names())}")
    if not callable(builder):
        raise ValueError(f"register_network({name!r}): the builder must be callable, got "
                         f"{type(builder).__name__}")
    MODELS[name] = builder


def model_names() -> list[str]:
    """Registered network names, sorted (for error messages and CLI listings)."""
    return sorted(MODELS)


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    image_size: int,
    width: int = 128,
    depth: int | None = None,
    norm: str = "batch",
) -> nn.Module:
    """Build a registered network with PyTorch's default initialisation.

    `width` and `depth` apply to the ConvNet only; the other networks ignore them so that one
    `model` config section serves every name. All problems are collected and raised together.
    """
    problems = []
    if name not in MODELS:
        problems.append(f"unknown model {name!r}; valid names: {', '.join(model_names())}")
    if norm not in NORMS:
        problems.append(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    for key, value in (
        ("in_channels", in_channels), ("num_classes", num_classes),
        ("image_size", image_size), ("width", width),
    ):  # fmt: skip
        if problem := int_problem(key, value):
            problems.append(problem)
    if problems:
        raise ValueError("; ".join(problems))
    return MODELS[name](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size,
        width=width, depth=depth, norm=norm,
    )  # fmt: skip


@torch.no_grad()
def eval_outputs(net: nn.Module, x: Tensor, fn: Callable[[Tensor, int], Any], *,
                 batch_size: int = 1024) -> list:
    """``fn(outputs, start)`` for every ``batch_size`` rows of ``x`` (``start``: the first row's
    index), the network in eval mode (running BN statistics) on its own device; its mode is
    restored afterwards."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    try:
        return [fn(net(x[start:start + batch_size].to(device)), start)
                for start in range(0, len(x), batch_size)]
    finally:
        net.train(was_training)
