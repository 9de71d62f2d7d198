"""A network's parameters as one flat vector, and a forward pass with given parameters.

Expert trajectories are stored as flat vectors θ_0…θ_E, the student takes N SGD steps on a flat
vector, and the replay (docs/design.md §3) differentiates a step θ_{k+1} = θ_k − lr·g_k with respect
to θ_k, the images and lr. That needs a forward pass with *given* parameters that stays
differentiable twice, which `torch.func.functional_call` provides without mutating or copying
the module (`functional_forward`); `ParamLayout` maps the flat vector to named tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["ParamLayout", "functional_forward", "step_loss"]


@dataclass(frozen=True)
class ParamLayout:
    """Where each parameter lives in a flat vector: names and shapes in `named_parameters()` order.

    Trajectories, the student's θ and the replay's λ are all flat vectors; the layout is the one
    place that maps them back to named tensors. Buffers (BN running stats) are not part of it:
    they are not optimised and in train mode they do not affect the output.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...] = field(init=False, repr=False, compare=False)
    offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    numel: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        if len(names) != len(shapes):
            raise ValueError(f"ParamLayout has {len(names)} names but {len(shapes)} shapes")
        if len(set(names)) != len(names):
            raise ValueError("ParamLayout names must be unique")
        numels = tuple(math.prod(s) for s in shapes)
        offsets = tuple(sum(numels[:i]) for i in range(len(numels)))
        for key, value in (("names", names), ("shapes", shapes), ("numels", numels),
                           ("offsets", offsets), ("numel", sum(numels))):  # fmt: skip
            object.__setattr__(self, key, value)

    @classmethod
    def of(cls, module: nn.Module) -> ParamLayout:
        """Layout of a module's parameters (not buffers)."""
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    def flatten(self, params: Mapping[str, Tensor] | nn.Module) -> Tensor:
        """Concatenate the named tensors into one 1-D tensor; differentiable (cat of reshapes).

        Extra entries in a mapping (e.g. buffers of a state_dict) are ignored; missing names or
        wrong shapes raise, so a trajectory can never be silently mis-assembled.
        """
        if isinstance(params, nn.Module):
            params = dict(params.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"parameters missing from the mapping: {missing}")
        for name, shape in zip(self.names, self.shapes):
            if tuple(params[name].shape) != shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(params[name].shape)}, expected {shape}"
                )
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Named views into `flat` (no copy), so gradients flow back to the flat vector."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(
                f"expected a 1-D tensor of {self.numel} elements, got shape {tuple(flat.shape)}"
            )
        return {
            name: flat.narrow(0, offset, size).view(shape)
            for name, shape, offset, size in zip(self.names, self.shapes, self.offsets, self.numels)
        }

    def to_dict(self) -> dict:
        """JSON-serialisable form, stored next to expert trajectories."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, data: Mapping) -> ParamLayout:
        """Inverse of `to_dict`."""
        return cls(tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]))


def functional_forward(
    model: nn.Module,
    params: Tensor | Mapping[str, Tensor],
    x: Tensor,
    layout: ParamLayout | None = None,
    *,
    buffers: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Run `model` on `x` with the given parameters instead of its own.

    `params` is a flat vector (split with `layout`, or `ParamLayout.of(model)` when None; pass a
    layout in hot loops to skip rebuilding it) or a name → tensor mapping covering every
    parameter. The result is differentiable twice with respect to the parameters and `x`
    (create_graph=True through a parameter gradient), which the matching step needs.

    Buffers come from the module unless `buffers` is given. In train mode BatchNorm normalises
    with batch statistics and *updates the running stats in place* in whichever buffers are used;
    the output does not depend on them. Pass cloned buffers to leave the module untouched.
    Strict matching: a missing or unknown name raises instead of falling back to the module's own
    parameters.
    """
    if isinstance(params, Tensor):
        params = (ParamLayout.of(model) if layout is None else layout).unflatten(params)
    bufs = dict(model.named_buffers()) if buffers is None else dict(buffers)
    return torch.func.functional_call(model, (dict(params), bufs), (x,), strict=True)


def step_loss(logits: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
    """The student's loss on one BN group: cross-entropy summed over the group's rows and
    divided by the step's |b| (``batch``), so that the groups' losses (and gradients) add up to
    the step's mean over all |b| rows, however the step is cut into groups and ranks. The one
    definition the eager, compiled and team steps and the FLOP count use."""
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / batch

