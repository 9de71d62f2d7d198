"""Tests for distill/models.py: registry, architectures, flat parameters, double backward."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck

from distill.models import MODELS, NORMS, build_model, model_names
from distill.params import ParamLayout, functional_forward

NUM_CLASSES = 3


def _build(name: str, in_channels: int, image_size: int, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        name, in_channels=in_channels, num_classes=NUM_CLASSES, image_size=image_size, **kw
    )


def _images(in_channels: int, image_size: int, batch: int = 2, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, in_channels, image_size, image_size, generator=gen, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Registry and shapes


def test_registry_names():
    assert model_names() == ["convnet", "resnet18", "resnet34", "resnet50", "vgg11", "vgg16"]
    assert set(model_names()) == {"convnet", "resnet18", "resnet34", "resnet50", "vgg11", "vgg16"}
    with pytest.raises(ValueError, match="unknown model 'vit'; valid names: convnet, resnet18, "
                                         "resnet34, resnet50, vgg11, vgg16"):
        build_model("vit", in_channels=1, num_classes=3, image_size=8)


SHAPES = [(1, 8), (3, 32)]
CONVNET_EXTRA_SHAPES = [(1, 28), (3, 64)]


@pytest.mark.parametrize("in_channels,image_size", SHAPES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name, in_channels, image_size):
    model = _build(name, in_channels, image_size)
    with torch.no_grad():
        out = model(_images(in_channels, image_size))
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("in_channels,image_size", CONVNET_EXTRA_SHAPES)
def test_convnet_forward_shape_other_sizes(in_channels, image_size):
    model = _build("convnet", in_channels, image_size, width=16)
    out = model(_images(in_channels, image_size))
    assert out.shape == (2, NUM_CLASSES)


def test_resnet_64px_uses_strided_stem():
    model = _build("resnet18", 3, 64)
    assert model.stem[0].stride == (2, 2)
    assert _build("resnet18", 3, 32).stem[0].stride == (1, 1)
    with torch.no_grad():
        assert model(_images(3, 64)).shape == (2, NUM_CLASSES)


def test_convnet_default_depth_and_features():
    assert _build("convnet", 3, 32, width=8).depth == 3
    assert _build("convnet", 3, 64, width=8).depth == 4
    model = _build("convnet", 1, 28, width=8)  # 28 -> 14 -> 7 -> 3
    assert model.classifier.in_features == 8 * 3 * 3
    model = _build("convnet", 1, 8, width=8, depth=3)  # 8 -> 4 -> 2 -> 1
    assert model.classifier.in_features == 8


def test_vgg_skips_pools_on_small_images():
    pools = lambda m: sum(isinstance(layer, nn.MaxPool2d) for layer in m.features)  # noqa: E731
    assert pools(_build("vgg11", 1, 8)) == 3
    assert pools(_build("vgg11", 1, 28)) == 4
    assert pools(_build("vgg16", 3, 32)) == 5


def test_parameter_counts_match_reference_architectures():
    """Pins the standard CIFAR architectures (10 classes, 3 channels, 32 px)."""
    expected = {
        "convnet": 320_010,  # MTT ConvNet-128, depth 3
        "resnet18": 11_173_962,
        "resnet50": 23_520_842,
        "vgg11": 9_231_114,
    }
    for name, count in expected.items():
        model = build_model(name, in_channels=3, num_classes=10, image_size=32)
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert ParamLayout.of(model).numel == count


@pytest.mark.parametrize("norm", NORMS)
def test_convnet_norms(norm):
    model = _build("convnet", 3, 8, width=8, depth=2, norm=norm)
    kinds = {type(layer) for layer in model.features}
    expected = {
        "batch": nn.BatchNorm2d, "instance": nn.GroupNorm, "group": nn.GroupNorm,
        "none": nn.Identity,
    }[norm]  # fmt: skip
    assert expected in kinds
    out = model(_images(3, 8))
    out.sum().backward()
    assert out.shape == (2, NUM_CLASSES)
    if norm == "instance":
        assert model.features[1].num_groups == 8


def test_group_norm_uses_a_divisor():
    model = _build("convnet", 3, 8, width=48, depth=1, norm="group")
    assert model.features[1].num_groups == 24
    assert _build("convnet", 3, 8, width=128, depth=1, norm="group").features[1].num_groups == 32


@pytest.mark.parametrize("norm", ["instance", "group", "none"])
def test_other_norms_for_resnet_and_vgg(norm):
    for name in ("resnet18", "vgg11"):
        out = _build(name, 1, 8, norm=norm)(_images(1, 8))
        assert out.shape == (2, NUM_CLASSES)


def test_build_is_deterministic_given_seed_and_never_reseeds():
    a = ParamLayout.of(m := _build("convnet", 1, 8, width=8)).flatten(m)
    b = ParamLayout.of(m := _build("convnet", 1, 8, width=8)).flatten(m)
    torch.manual_seed(1)
    c = ParamLayout.of(m := build_model("convnet", in_channels=1, num_classes=3, image_size=8,
                                        width=8)).flatten(m)  # fmt: skip
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# Errors


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9'") as info:
        build_model("resnet9", in_channels=3, num_classes=10, image_size=32)
    for name in MODELS:
        assert name in str(info.value)


def test_bad_norm_lists_valid_norms():
    for name in ("convnet", "resnet18", "vgg11"):
        with pytest.raises(ValueError, match="batch, instance, group, none"):
            build_model(name, in_channels=3, num_classes=10, image_size=32, norm="layer")


def test_too_deep_convnet_names_max_depth():
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        build_model("convnet", in_channels=1, num_classes=10, image_size=8, depth=4)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        build_model("convnet", in_channels=1, num_classes=10, image_size=28, depth=5)
    with pytest.raises(ValueError, match="depth"):
        build_model("convnet", in_channels=1, num_classes=10, image_size=8, depth=0)


def test_bad_sizes_are_reported_together():
    with pytest.raises(ValueError) as info:
        build_model("convnet", in_channels=0, num_classes=10, image_size=32, width=2.5)
    assert "in_channels" in str(info.value) and "width" in str(info.value)


# --------------------------------------------------------------------------------------------
# Flat parameters


@pytest.mark.parametrize("name", sorted(MODELS))
def test_functional_forward_matches_module(name):
    model = _build(name, 1, 8).train()
    x = _images(1, 8)
    expected = model(x)
    layout = ParamLayout.of(model)
    flat = layout.flatten(model)
    by_flat = functional_forward(model, flat, x, layout)
    by_flat_no_layout = functional_forward(model, flat, x)
    by_dict = functional_forward(model, dict(model.named_parameters()), x)
    assert torch.equal(by_flat, expected)
    assert torch.equal(by_flat_no_layout, expected)
    assert torch.equal(by_dict, expected)


def test_functional_forward_uses_given_parameters_and_flows_gradients():
    model = _build("convnet", 1, 8, width=8, depth=2)
    layout = ParamLayout.of(model)
    flat = torch.zeros(layout.numel, requires_grad=True)
    out = functional_forward(model, flat, _images(1, 8), layout)
    assert torch.equal(out, torch.zeros_like(out))  # all-zero weights and biases
    out.sum().backward()
    assert flat.grad is not None and flat.grad.shape == flat.shape
    assert all(p.grad is None for p in model.parameters())  # the module's own are untouched


def test_functional_forward_rejects_incomplete_mapping():
    model = _build("convnet", 1, 8, width=8, depth=1)
    params = dict(model.named_parameters())
    params.pop("classifier.bias")
    with pytest.raises(Exception, match="classifier.bias"):
        functional_forward(model, params, _images(1, 8))


def test_functional_forward_with_cloned_buffers_leaves_module_untouched():
    model = _build("convnet", 1, 8, width=8, depth=1).train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    functional_forward(model, ParamLayout.of(model).flatten(model), _images(1, 8), buffers=buffers)
    for key, value in model.named_buffers():
        assert torch.equal(value, before[key])
    assert not torch.equal(buffers["features.1.running_mean"], before["features.1.running_mean"])


def test_layout_roundtrip():
    model = _build("resnet18", 1, 8)
    layout = ParamLayout.of(model)
    params = dict(model.named_parameters())
    assert layout.names == tuple(params)
    assert layout.numel == sum(p.numel() for p in model.parameters())
    assert layout.offsets[0] == 0 and layout.offsets[-1] + layout.numels[-1] == layout.numel
    flat = layout.flatten(model)
    assert flat.dim() == 1 and flat.numel() == layout.numel
    restored = layout.unflatten(flat)
    assert list(restored) == list(params)
    for name, tensor in restored.items():
        assert torch.equal(tensor, params[name])
        assert tensor.data_ptr() >= flat.data_ptr()  # a view, not a copy
    assert torch.equal(layout.flatten(restored), flat)
    assert torch.equal(layout.flatten(model.state_dict()), flat)  # buffers are ignored


def test_layout_json_roundtrip():
    layout = ParamLayout.of(_build("convnet", 3, 32, width=8))
    again = ParamLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout
    assert again.numel == layout.numel and again.offsets == layout.offsets


def test_layout_rejects_bad_inputs():
    model = _build("convnet", 1, 8, width=8, depth=1)
    layout = ParamLayout.of(model)
    with pytest.raises(ValueError, match="1-D"):
        layout.unflatten(torch.zeros(layout.numel + 1))
    wrong = dict(model.named_parameters())
    wrong["classifier.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match="classifier.bias"):
        layout.flatten(wrong)
    with pytest.raises(KeyError):
        layout.flatten({})


def test_unflatten_is_differentiable():
    layout = ParamLayout(("a", "b"), ((2, 3), (4,)))
    flat = torch.arange(10.0, requires_grad=True)
    parts = layout.unflatten(flat)
    (parts["a"].sum() * 2 + parts["b"].sum() * 3).backward()
    assert torch.equal(flat.grad, torch.tensor([2.0] * 6 + [3.0] * 4))


# --------------------------------------------------------------------------------------------
# Double backward: the matching step differentiates θ − lr·∇θ loss w.r.t. θ, images and lr


def _unrolled_step(norm: str):
    """Tiny float64 ConvNet and f(θ, x, lr) = ‖θ − lr·∇θ CE(f_θ(x), y) − target‖²."""
    model = _build("convnet", 1, 8, width=8, depth=2, norm=norm).double().train()
    layout = ParamLayout.of(model)
    gen = torch.Generator().manual_seed(2)
    target = torch.randn(layout.numel, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])

    def step(theta, images, lr):
        loss = F.cross_entropy(functional_forward(model, theta, images, layout), labels)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        return ((theta - lr * grad - target) ** 2).sum()

    theta = layout.flatten(model).detach().clone().requires_grad_(True)
    images = _images(1, 8, batch=4, dtype=torch.float64).requires_grad_(True)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    return step, theta, images, lr


def test_double_backward_batchnorm_matches_finite_differences():
    """Full gradcheck w.r.t. images and lr (θ fixed): every image pixel is checked."""
    step, theta, images, lr = _unrolled_step("batch")
    assert gradcheck(
        lambda x, lr: step(theta, x, lr), (images, lr), eps=1e-6, atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize("norm", NORMS)
def test_double_backward_all_inputs_every_norm(norm):
    """Fast-mode gradcheck (random projections) over θ, images and lr for each norm."""
    step, theta, images, lr = _unrolled_step(norm)
    inputs = (theta, images, lr)
    assert gradcheck(step, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_eval_outputs_is_one_batched_eval_mode_pass_that_restores_the_mode():
    from distill.models import eval_outputs

    net = _build("convnet", 1, 8)
    net.train()(torch.randn(16, 1, 8, 8))  # running statistics away from their start
    x = torch.randn(10, 1, 8, 8)
    with torch.no_grad():
        whole = net.eval()(x)
    net.train()
    parts = eval_outputs(net, x, lambda out, start: (start, out), batch_size=4)
    assert [start for start, _ in parts] == [0, 4, 8] and net.training
    assert torch.allclose(torch.cat([out for _, out in parts]), whole, atol=1e-6)
    assert not torch.allclose(net(x), whole)  # train mode (batch statistics) differs
