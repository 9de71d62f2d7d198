"""Test problems and helpers shared by the test modules (and the benchmarks' reference).

* :func:`matching_problem`: one matching step of a tiny ConvNet-BN on 8×8 images, in float64 by
  default: (student, start, target, images, labels, lr, plan), the arguments of ``match_replay``;
* :func:`match_unrolled`: the reference algorithm, one graph through all N steps (what the
  MTT/SelMatch code does), against which the replay and the fast path are checked and benchmarked
  (bench/matching_probe.py imports it from here: it is not product API);
* :func:`rel`: relative error of one tensor against another;
* :func:`precision_problem`, :func:`moved_start`, :func:`float64_references`,
  :func:`float32_errors`: float32 matching against
  float64 on an expert-like problem, from starts moved by one ulp (tests/test_fast_precision.py
  and bench/precision_probe.py);
* :func:`replaced_step`: run code with ``Distiller.step`` wrapped (to kill or poison a run at an
  iteration).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch

from distill.augment import DSA, DSAConfig, FAMILIES
from distill.matching import MatchPlan, MatchResult, Share, Student, make_plan, match_replay
from distill.models import build_model
from distill.params import ParamLayout

DT = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def matching_problem(*, n: int = 12, classes: int = 3, depth: int = 2, norm: str = "batch",
                     steps: int = 3, batch: int = 6, group: int = 6,
                     families: tuple[str, ...] | None = FAMILIES, seed: int = 0,
                     plan_seed: int | None = None, iteration: int = 5, dtype=DT,
                     student: bool = True):
    """A width-4 ConvNet on ``n`` random 8×8 images, target 0.05 from the start, lr 0.3, DSA of
    ``families`` (None or () = no augmentation). With ``student=False`` the model and the DSA
    are returned in place of the student: (model, dsa, start, target, images, labels, lr, plan)."""
    torch.manual_seed(seed)
    model = build_model("convnet", in_channels=1, num_classes=classes, image_size=8, width=4,
                        depth=depth, norm=norm).to(dtype)
    start = ParamLayout.of(model).flatten(model).detach().clone()
    target = start + 0.05 * torch.randn_like(start)
    images = torch.randn(n, 1, 8, 8, dtype=dtype)
    labels = torch.arange(n) % classes
    dsa = DSA(DSAConfig(families=tuple(families))) if families else None
    plan = make_plan(n, batch=batch, steps=steps, group=group, image_size=(8, 8), dsa=dsa,
                     seed=seed if plan_seed is None else plan_seed, iteration=iteration)
    lr = torch.tensor(0.3, dtype=dtype)
    if not student:
        return model, dsa, start, target, images, labels, lr, plan
    return Student.of(model, dsa, dtype, "cpu"), start, target, images, labels, lr, plan


def expert_like_target(model: torch.nn.Module, start: torch.Tensor, images: torch.Tensor,
                       labels: torch.Tensor, *, steps: int = 20, batch: int = 64,
                       lr: float = 0.05) -> torch.Tensor:
    """θ after ``steps`` plain float64 SGD steps of ``model`` on the images from ``start`` (on
    the CPU): like an expert's θ*_{t+M}, the target lies along gradient directions (a random
    target makes the matching gradient a sum of large cancelling terms)."""
    student = Student.of(copy.deepcopy(model).to("cpu", torch.float64), None, torch.float64,
                         "cpu", compile="off")
    x, y = images.to("cpu", torch.float64), labels.to("cpu")
    theta = start.to("cpu", torch.float64).clone()
    for j in range(steps):
        rows = torch.arange(j * batch, (j + 1) * batch) % len(x)
        theta -= lr * student.steps.gradient(theta, x[rows], y[rows], None, group=batch,
                                             batch=batch)
    return theta.detach()


# bench/precision_probe.py's problems; "small" is tests/test_fast_precision.py's, where one ulp
# flips few ReLU and max-pool choices
PRECISION_PROBLEMS = {
    "full": {"width": 64, "depth": 3, "size": 32, "n": 500, "batch": 32, "steps": 10, "plans": 5,
             "target_batch": 64},
    "small": {"width": 32, "depth": 2, "size": 16, "n": 200, "batch": 32, "steps": 6, "plans": 3,
              "target_batch": 32},
}


def precision_problem(kind: str):
    """(model, start64, images, labels, target64, plans): a ConvNet-BN on random-normal float32
    images of 10 classes, |b| = g, no DSA, the target :func:`expert_like_target` in float64."""
    p = PRECISION_PROBLEMS[kind]
    torch.manual_seed(0)
    model = build_model("convnet", in_channels=3, num_classes=10, image_size=p["size"],
                        width=p["width"], depth=p["depth"], norm="batch")
    start64 = ParamLayout.of(model).flatten(model).detach().double()
    images = torch.randn(p["n"], 3, p["size"], p["size"], dtype=torch.float64,
                         generator=torch.Generator().manual_seed(1)).float()
    labels = torch.arange(p["n"]) % 10
    target64 = expert_like_target(model, start64, images.double(), labels,
                                  batch=p["target_batch"])
    plans = [make_plan(p["n"], batch=p["batch"], steps=p["steps"], group=p["batch"],
                       image_size=(p["size"],) * 2, dsa=None, seed=0, iteration=i)
             for i in range(p["plans"])]
    return model, start64, images, labels, target64, plans


def moved_start(start: torch.Tensor, k: int) -> torch.Tensor:
    """``start`` (k = 0) or, for k ≥ 1, each entry moved by 0 or ±1 ulp at random (seed k)."""
    if k == 0:
        return start.clone()
    sign = torch.randint(0, 3, start.shape, generator=torch.Generator().manual_seed(k)) - 1
    up, down = torch.full_like(start, 1e9), torch.full_like(start, -1e9)
    return torch.where(sign > 0, torch.nextafter(start, up),
                       torch.where(sign < 0, torch.nextafter(start, down), start))


def float64_references(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       target64: torch.Tensor, plans: list,
                       starts: list[torch.Tensor]) -> list[list[MatchResult]]:
    """The float64 eager replay of every plan from every start (inner lr 0.01)."""
    s64 = Student.of(copy.deepcopy(model).double(), None, torch.float64, "cpu", compile="off")
    lr64 = torch.tensor(0.01, dtype=torch.float64)
    return [[match_replay(s64, st.double(), target64, images.double(), labels, lr64, plan)
             for plan in plans] for st in starts]


def float32_errors(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   target64: torch.Tensor, plans: list, starts: list[torch.Tensor],
                   references: list[list[MatchResult]], compile: str,
                   backend: str = "inductor"):
    """(image, lr, path): per plan, the relative error of the float32 matching gradients at each
    start against its :func:`float64_references`, and the path that ran (its first-call check may
    have dropped the compiled one). Inner lr 0.01; ``compile`` is ``distill.compile``,
    ``backend`` the compiled path's torch.compile backend."""
    student = Student.of(copy.deepcopy(model).float(), None, torch.float32, "cpu",
                         compile=compile, backend=backend)
    if student.steps.name.startswith("compiled") != (compile == "on"):
        raise RuntimeError(f"distill.compile {compile} ran {student.steps.name}")
    image, lr = [[] for _ in plans], [[] for _ in plans]
    for k, st in enumerate(starts):
        for i, plan in enumerate(plans):
            r = match_replay(student, st, target64.float(), images, labels, torch.tensor(0.01),
                             plan)
            image[i].append(rel(r.grad_images, references[k][i].grad_images))
            lr[i].append(rel(r.grad_lr.reshape(1), references[k][i].grad_lr.reshape(1)))
    return image, lr, student.steps.name


def match_unrolled(student: Student, start: torch.Tensor, target: torch.Tensor,
                   images: torch.Tensor, labels: torch.Tensor, lr: torch.Tensor,
                   plan: MatchPlan) -> MatchResult:
    """The reference algorithm: one graph through all N steps (memory ∝ N·|b|), one process."""
    plan = plan.to(images.device)
    x = images.detach().requires_grad_(True)
    lr_leaf = lr.detach().requires_grad_(True)
    theta = start.detach()
    for step in plan.steps:
        th = theta if theta.requires_grad else theta.requires_grad_(True)
        loss = sum(student.group_loss(th, x[rows], labels[rows], aug, plan.batch)
                   for rows, aug in (Share(gid * plan.group, (gid + 1) * plan.group, None,
                                           plan.group).rows(step)
                                     for gid in range(plan.num_groups)))
        g = torch.autograd.grad(loss, th, create_graph=True)[0]
        theta = th - lr_leaf * g
    denom = (start - target).pow(2).sum()
    loss = (theta - target).pow(2).sum() / denom
    grad_images, grad_lr = torch.autograd.grad(loss, [x, lr_leaf])
    return MatchResult(loss.detach(), grad_images, grad_lr, float(denom))


@contextlib.contextmanager
def replaced_step(wrap: Callable[[Callable, object, int], dict]) -> Iterator[None]:
    """``Distiller.step`` becomes ``wrap(real_step, self, iteration)`` inside the block."""
    from distill.distiller import Distiller

    real = Distiller.step
    Distiller.step = lambda self, it: wrap(real, self, it)
    try:
        yield
    finally:
        Distiller.step = real


def killed_at(iteration: int) -> contextlib.AbstractContextManager:
    """Within the block a distillation raises KeyboardInterrupt as it starts ``iteration``."""
    def wrap(real, self, it):
        if it == iteration:
            raise KeyboardInterrupt("killed")
        return real(self, it)
    return replaced_step(wrap)


def protocol(info=None, *, epochs: int, augment: str = "combined", **eval_fields):
    """An evaluation :class:`~distill.evaluate.Protocol` from ``eval.*`` fields (a ConvNet by
    default; not validated, so that tests can pass what validation refuses), on a dataset with
    ``info``'s normalisation (default digits)."""
    from distill.config_io import from_dict
    from distill.data import get_info
    from distill.evaluate import Protocol

    cfg = from_dict({"eval": {"model": "convnet", **eval_fields}}, check=False)
    return Protocol.of(cfg, info or get_info("digits"), epochs=epochs, augment=augment)



SHAPES = ("circle", "square", "triangle")


def write_shapes(root, *, per_class: int = 30, val: int = 10, size: int = 32,
                 seed: int = 0) -> None:
    """An image folder of real-looking pictures: root/{train,val}/<shape>/<i>.png, each a filled
    circle, square or triangle of random size, place and colour on a random two-colour gradient
    with pixel noise (what docs/data.md's recipe is for: a few hundred small photos by class)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a, b = rng.uniform(0, 255, (2, 3))
                ramp = np.linspace(0, 1, size)[:, None, None]
                if rng.random() < 0.5:
                    ramp = ramp.transpose(1, 0, 2)
                background = a + (b - a) * ramp * np.ones((size, size, 1))
                img = Image.fromarray(background.clip(0, 255).astype(np.uint8))
                r = rng.uniform(0.2, 0.4) * size
                cx, cy = rng.uniform(r, size - r, 2)
                colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
                draw = ImageDraw.Draw(img)
                if shape == "circle":
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
                elif shape == "square":
                    draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
                noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 8, (size, size, 3))
                Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
