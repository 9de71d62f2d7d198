"""Evaluation: train fresh networks on a (synthetic) image set and test them on the real test set.

The protocol is the paper's (App. B.3, docs/design.md §7): SGD with momentum 0.9, weight decay 5e-4,
lr 0.1 with a cosine schedule stepped every iteration, batch 128, and epochs = 25% of a 200-epoch
full-data budget (:func:`eval_epochs`). Augmentation is batched on the device; the default
"combined" one applies DSA to distilled rows and crop + flip to selected real rows (crop padding
4 px at 32 and 64 px as in the paper, 1 px for 8×8 digits: ``distill.augment.crop_pad``).

Beyond mean ± std over runs, a :class:`Reference` built from a trained expert adds two
diagnostics: accuracy on the easy and hard halves of the test set (split by the expert's EL2N)
and coverage, the share of test samples whose feature lies within r of a synthetic sample.

Decisions:

* Every random choice derives from the seed and a position (docs/design.md §9): run k of
  :func:`evaluate_images` trains with a seed derived from (seed, k); inside
  :func:`train_network` the initialisation, the shuffle of each epoch and the augmentation of
  each step draw from separate generators (distill/rng.py). Nothing reads the clock. On CPU the same
  seed gives bitwise identical networks; on CUDA the convolution backward may differ in the last
  bits between runs.
* A trailing minibatch of a single sample is merged into the previous one, so BatchNorm in train
  mode always sees at least two samples (a ResNet on 8×8 digits reaches 1×1 maps, where one
  sample has no variance and PyTorch raises).
* Nothing here selects by test accuracy: every run is reported, and the caller passes the final
  synthetic set.
* The std over runs is the population std (ddof = 0), so one run gives 0.0.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill.augment import AUGMENTS, RealAugment, build_augment, has_real_part
from distill.checks import check_int, int_problem
from distill.data import Dataset
from distill.methods import eval_network, real_augment
from distill.models import build_model, eval_outputs
from distill.rng import (
    EVAL_AUGMENT,
    EVAL_INIT,
    EVAL_RADIUS,
    EVAL_RUN,
    EVAL_SHUFFLE,
    derived_seed,
    seeded,
)
from distill.runtime import cpu_threads

__all__ = [
    "EvalResult", "ImageSet", "Protocol", "Reference", "config_epochs", "coverage",
    "coverage_of", "eval_epochs", "evaluate_images", "evaluate_sets", "nn_radius", "run_correct",
    "run_jobs", "run_set", "summarize", "train_network",
]  # fmt: skip

_CHUNK = 1024  # rows per cdist block: 1024 × 50k distances are 200 MB in float32


# --------------------------------------------------------------------------------------------
# Epoch rule
# --------------------------------------------------------------------------------------------


def eval_epochs(ratio: float, *, full_epochs: int = 200, budget: float = 0.25) -> int:
    """Epochs for a synthetic set holding `ratio` of the training images (paper App. B.3).

    A fixed compute budget (25% of a 200-epoch full-data run) spread over fewer images means more
    epochs: round(budget · full_epochs / ratio), rounded half up, giving 1000 / 500 / 250 / 167
    for 5 / 10 / 20 / 30%.
    """
    problems = []
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        problems.append(f"ratio (synthetic / real training images) must be in (0, 1], "
                        f"got {ratio!r}")
    if problem := int_problem("full_epochs", full_epochs):
        problems.append(problem)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        problems.append(f"budget must be > 0, got {budget!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return max(1, math.floor(budget * full_epochs / ratio + 0.5))


# --------------------------------------------------------------------------------------------
# Training one network
# --------------------------------------------------------------------------------------------


def _check_training_inputs(images: Tensor, labels: Tensor, num_classes: int, epochs: int,
                           batch_size: int, augment: str, is_distilled: Tensor | None) -> None:
    """Collect every problem with the inputs of train_network and raise once."""
    problems = []
    if images.dim() != 4 or images.shape[0] == 0 or images.shape[2] != images.shape[3]:
        problems.append(f"images must be a non-empty [N, C, H, H] tensor, got shape "
                        f"{tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        problems.append(f"labels must be [N] with N = {images.shape[0]} (one per image), got "
                        f"shape {tuple(labels.shape)}")
    elif labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        problems.append(f"labels must be in 0..{num_classes - 1}, got "
                        f"{int(labels.min())}..{int(labels.max())}")
    problems += [p for p in (int_problem("epochs", epochs), int_problem("batch_size", batch_size))
                 if p]
    if augment not in AUGMENTS:
        problems.append(f"unknown augment {augment!r}; valid: {', '.join(sorted(AUGMENTS))}")
    if is_distilled is not None and tuple(is_distilled.shape) != (images.shape[0],):
        problems.append(f"is_distilled must be [N] with N = {images.shape[0]}, got shape "
                        f"{tuple(is_distilled.shape)}")
    if problems:
        raise ValueError("train_network: " + "; ".join(problems))


def _batches(order: Tensor, batch_size: int) -> list[Tensor]:
    """Consecutive minibatches of `order`; a trailing single sample joins the previous batch."""
    parts = list(order.split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return len(_batches(torch.arange(n), batch_size))


def _fresh_network(model: str, images: Tensor, num_classes: int, seed: int, *, width: int,
                   depth: int | None, norm: str) -> nn.Module:
    """A fresh network, initialised on CPU from a seed-derived value (device independent)."""
    with seeded(EVAL_INIT.generator(seed)):
        return build_model(model, in_channels=images.shape[1], num_classes=num_classes,
                           image_size=images.shape[2], width=width, depth=depth, norm=norm)


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """How one evaluation network is trained: the network, the epochs, the optimiser, the batch
    and the augmentation (and how it crops and flips real rows). Built from a run config's
    ``eval`` section (:meth:`of`), which holds every default: nothing here repeats them."""

    model: str
    epochs: int
    augment: str
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    width: int
    depth: int | None
    norm: str
    real: RealAugment = RealAugment()

    @classmethod
    def of(cls, cfg, info, *, epochs: int, augment: str) -> Protocol:
        """``cfg``'s protocol (the network of distill.methods.eval_network, the crop + flip of
        distill.methods.real_augment on a dataset with ``info``'s normalisation)."""
        ev = cfg.eval
        return cls(model=ev.model, epochs=epochs, augment=augment, lr=ev.lr,
                   momentum=ev.momentum, weight_decay=ev.weight_decay, batch_size=ev.batch_size,
                   real=real_augment(cfg, info), **eval_network(cfg))


def train_network(images: Tensor, labels: Tensor, *, num_classes: int, protocol: Protocol,
                  is_distilled: Tensor | None = None, seed: int = 0,
                  device: str | torch.device = "cpu", progress: bool = False) -> nn.Module:
    """Train a fresh network on (images, labels) by ``protocol``; return it in eval mode.
    Images are in model input space; ``is_distilled`` (None = all False) marks the rows that the
    "combined" augmentation treats with DSA, the other rows get crop (+ flip, as
    ``protocol.real`` says)."""
    p = protocol
    _check_training_inputs(images, labels, num_classes, p.epochs, p.batch_size, p.augment,
                           is_distilled)
    device = torch.device(device)
    net = _fresh_network(p.model, images, num_classes, seed, width=p.width, depth=p.depth,
                         norm=p.norm).to(device)
    net.train()
    x, y = images.detach().to(device), labels.detach().long().to(device)
    n = x.shape[0]
    mask = (torch.zeros(n, dtype=torch.bool) if is_distilled is None
            else is_distilled.detach().bool().cpu())
    opt = torch.optim.SGD(net.parameters(), lr=p.lr, momentum=p.momentum,
                          weight_decay=p.weight_decay, nesterov=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=p.epochs * _steps_per_epoch(n, p.batch_size))
    aug = build_augment(p.augment, real=p.real)
    bar = tqdm(range(p.epochs), desc=f"train {p.model}", disable=not progress, leave=False)
    for epoch in bar:
        order = torch.randperm(n, generator=EVAL_SHUFFLE.generator(seed, epoch))
        total = 0.0
        for step, idx in enumerate(_batches(order, p.batch_size)):
            gen = EVAL_AUGMENT.generator(seed, epoch, step)
            xb = aug(x[idx.to(device)], gen, dsa_mask=mask[idx])
            loss = F.cross_entropy(net(xb), y[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        bar.set_postfix(loss=f"{total / n:.3f}")
    return net.eval()


def _predict(net: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Predicted labels (CPU, int64) in eval mode, batched."""
    return torch.cat(eval_outputs(net, x, lambda out, _: out.argmax(1).cpu(),
                                  batch_size=batch_size))


# --------------------------------------------------------------------------------------------
# Distances: nearest-neighbour radius and coverage
# --------------------------------------------------------------------------------------------


def _check_features(name: str, f: Tensor, min_rows: int) -> None:
    if f.dim() != 2 or f.shape[0] < min_rows:
        raise ValueError(f"{name} must be a [n, d] tensor with n >= {min_rows}, got shape "
                         f"{tuple(f.shape)}")


def _nearest(queries: Tensor, points: Tensor, *, exclude_self: bool = False) -> Tensor:
    """Distance from each query row to its nearest row of `points`, in blocks of rows.

    With `exclude_self` the queries are `points` itself and each row's own column is skipped
    (by index, so duplicates of a point still count as neighbours at distance 0).
    """
    out = []
    for start in range(0, len(queries), _CHUNK):
        d = torch.cdist(queries[start:start + _CHUNK], points)
        if exclude_self:
            rows = torch.arange(d.shape[0], device=d.device)
            d[rows, rows + start] = math.inf
        out.append(d.min(dim=1).values)
    return torch.cat(out)


def nn_radius(features: Tensor) -> float:
    """Mean Euclidean distance from each point to its nearest OTHER point (the coverage radius)."""
    _check_features("features", features, 2)
    f = features.detach().float()
    return float(_nearest(f, f, exclude_self=True).mean())


def coverage(syn_features: Tensor, test_features: Tensor, radius: float) -> float:
    """Share of test points whose nearest synthetic point lies within `radius` (inclusive)."""
    _check_features("syn_features", syn_features, 1)
    _check_features("test_features", test_features, 1)
    if syn_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature sizes differ: synthetic {syn_features.shape[1]}, "
                         f"test {test_features.shape[1]}")
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    syn = syn_features.detach().float().to(test_features.device)
    nearest = _nearest(test_features.detach().float(), syn)
    return float((nearest <= radius).float().mean())


# --------------------------------------------------------------------------------------------
# Reference: easy/hard split and feature space from a trained expert
# --------------------------------------------------------------------------------------------


def _last_linear(net: nn.Module) -> nn.Linear:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no nn.Linear layer to take features from")
    return linears[-1]


def _features_and_logits(net: nn.Module, x: Tensor,
                         batch_size: int) -> tuple[Tensor, Tensor]:
    """Inputs of the last nn.Linear (penultimate features) and logits, eval mode, on CPU.

    The hook lives only for this call, so the caller's network is left as it was.
    """
    captured: list[Tensor] = []
    hook = _last_linear(net).register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().flatten(1).float().cpu()))
    try:
        logits = eval_outputs(net, x, lambda out, _: out.float().cpu(), batch_size=batch_size)
    finally:
        hook.remove()
    return torch.cat(captured), torch.cat(logits)


@dataclass
class Reference:
    """What evaluation needs from a trained expert: easy/hard split of the test set and a feature
    space. Build it once per dataset and expert; it does not depend on the synthetic set."""

    easy: Tensor  # bool [N_test]: the easier half of the test set
    feature_fn: Callable[[Tensor], Tensor]  # images -> penultimate features [n, d], CPU float32
    radius: float  # mean nearest-neighbour distance among real training features
    test_features: Tensor  # [N_test, d]

    @classmethod
    def from_expert(cls, expert_model: nn.Module, ds: Dataset, *, max_train: int = 5000,
                    batch_size: int = 1024) -> Reference:
        """Split, features and radius from a trained network (BN running stats already set).

        * Difficulty of a test sample = the expert's EL2N ‖softmax − onehot‖₂. easy = the
          floor(N/2) samples with the lowest EL2N (stable sort: ties go to the lower index);
          the hard half is the rest, ceil(N/2) samples.
        * Features = the input of the network's last nn.Linear (ConvNet, ResNet and VGG all end
          in one), taken with a forward hook.
        * radius = :func:`nn_radius` of the training features of at most `max_train` samples: all
          of them when the set is small enough, else a fixed-seed random subset (dataset order
          may be sorted by class, as for Tiny ImageNet, so "the first k" could miss classes).
        """
        check_int("max_train", max_train, 2)
        feature_fn = _FeatureFn(expert_model, batch_size)
        test_features, logits = _features_and_logits(expert_model, ds.x_test, batch_size)
        onehot = F.one_hot(ds.y_test.long(), logits.shape[1]).float()
        el2n = (logits.softmax(1) - onehot).norm(dim=1)
        easy = torch.zeros(len(el2n), dtype=torch.bool)
        easy[torch.sort(el2n, stable=True).indices[:len(el2n) // 2]] = True
        n_train = len(ds.y_train)
        keep = torch.arange(n_train)
        if n_train > max_train:
            gen = EVAL_RADIUS.generator(0)  # a property of the dataset, not of the run seed
            keep = torch.randperm(n_train, generator=gen)[:max_train].sort().values
        radius = nn_radius(feature_fn(ds.x_train[keep]))
        return cls(easy=easy, feature_fn=feature_fn, radius=radius, test_features=test_features)


class _FeatureFn:
    """images -> penultimate features of a network; a class so a Reference has a readable repr."""

    def __init__(self, net: nn.Module, batch_size: int) -> None:
        self.net, self.batch_size = net, batch_size

    def __call__(self, images: Tensor) -> Tensor:
        return _features_and_logits(self.net, images, self.batch_size)[0]

    def __repr__(self) -> str:
        return f"_FeatureFn({type(self.net).__name__}, batch_size={self.batch_size})"


# --------------------------------------------------------------------------------------------
# Evaluating an image set
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Test accuracy of `runs` networks trained on one image set, plus the Reference metrics."""

    accuracies: list[float]  # one per run, test accuracy in [0, 1]
    mean: float
    std: float  # population std over runs (ddof = 0): 0.0 for one run
    easy_acc: float | None  # mean over runs; None without a Reference
    hard_acc: float | None
    coverage: float | None  # None without a Reference; depends on the images only
    epochs: int
    runs: int
    model: str
    augment: str
    n_images: int
    width: int | None = None  # the evaluation network's settings (ConvNet width/depth, norm)
    depth: int | None = None
    norm: str | None = None
    flip: bool | None = None  # crop + flip of real rows: whether it flips (None: no such part)
    crop_fill: str | None = None  # what that crop shifts in (None: no such part)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (written to <run_dir>/eval/<method>.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        """Inverse of `to_dict` (reports read the saved JSON back)."""
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def _split_accuracy(correct: Tensor, reference: Reference | None) -> tuple[float, float] | None:
    if reference is None:
        return None
    easy = reference.easy.bool().cpu()
    return float(correct[easy].float().mean()), float(correct[~easy].float().mean())


def _mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def coverage_of(images: Tensor, reference: Reference) -> float:
    """Coverage of the test set by `images` in the reference's feature space."""
    return coverage(reference.feature_fn(images.detach()), reference.test_features,
                    reference.radius)


def run_correct(images: Tensor, labels: Tensor, ds: Dataset, *, run: int, protocol: Protocol,
                is_distilled: Tensor | None = None, seed: int = 0,
                device: str | torch.device = "cpu", progress: bool = False) -> Tensor:
    """Evaluation run `run` alone (seeded from (seed, run)): which test samples (bool, CPU) its
    network gets right. Runs are independent, so they may run anywhere in any order
    (launch/evaluate.py spreads them over Ray workers) and :func:`summarize` combines them."""
    net = train_network(images, labels, num_classes=ds.num_classes, protocol=protocol,
                        is_distilled=is_distilled,
                        seed=derived_seed(EVAL_RUN.generator(seed, run)), device=device,
                        progress=progress)
    return _predict(net, ds.x_test) == ds.y_test.cpu()


def summarize(corrects: list[Tensor], *, reference: Reference | None, coverage: float | None,
              protocol: Protocol, n_images: int, crop_fill: str | None = None) -> EvalResult:
    """An EvalResult from the per-run correctness vectors of :func:`run_correct`, in run order."""
    p = protocol
    accuracies = [float(c.float().mean()) for c in corrects]
    splits = [s for s in (_split_accuracy(c, reference) for c in corrects) if s is not None]
    real = has_real_part(p.augment)
    return EvalResult(accuracies=accuracies, mean=statistics.fmean(accuracies),
                      std=statistics.pstdev(accuracies),
                      easy_acc=_mean_or_none([e for e, _ in splits]),
                      hard_acc=_mean_or_none([h for _, h in splits]), coverage=coverage,
                      epochs=p.epochs, runs=len(corrects), model=p.model, augment=p.augment,
                      n_images=n_images, width=p.width, depth=p.depth, norm=p.norm,
                      flip=p.real.flip if real else None, crop_fill=crop_fill if real else None)


def config_epochs(eval_cfg, n_images: int, n_train: int) -> int:
    """`eval_cfg.epochs`, else the paper's rule on ratio = n_images / n_train."""
    if eval_cfg.epochs is not None:
        return eval_cfg.epochs
    return eval_epochs(n_images / max(1, n_train))


# --------------------------------------------------------------------------------------------
# Evaluating image sets with the settings of a run (the pipeline's one path, and the searches')
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    """What one row's evaluation trains on, with the row's augmentation (decided by
    ``distill.methods.augment_for``, the one rule) and repetition seed (None: the run's)."""

    images: Tensor
    labels: Tensor
    is_distilled: Tensor | None
    augment: str
    seed: int | None = None


Job = tuple[str, int, int]  # (set name, run index, epochs)


def run_set(cfg, ds: Dataset, images: ImageSet, run: int, epochs: int,
            device: str | torch.device = "cpu") -> Tensor:
    """One evaluation run of an image set with the settings of run config ``cfg`` (its
    :class:`Protocol`, ``eval.num_cpus`` threads): the test samples of ``ds`` it gets right. The
    unit that every evaluation executes, in-process or on a Ray worker (launch/evaluate.py)."""
    protocol = Protocol.of(cfg, ds.info, epochs=epochs, augment=images.augment)
    with cpu_threads(max(1, int(cfg.eval.num_cpus))):
        return run_correct(images.images, images.labels, ds, run=run, protocol=protocol,
                           is_distilled=images.is_distilled,
                           seed=cfg.seed if images.seed is None else images.seed, device=device)


def run_jobs(cfg, ds: Dataset, sets: dict[str, ImageSet], jobs: list[Job], *,
             device: str | torch.device = "cpu",
             progress: bool = False) -> dict[tuple[str, int], Tensor]:
    """Every job of ``jobs`` in this process, one after another: {(set, run): correct}."""
    done = {}
    for name, run, epochs in tqdm(jobs, desc="eval runs", disable=not progress):
        done[name, run] = run_set(cfg, ds, sets[name], run, epochs, device)
    return done


Runner = Callable[..., dict[tuple[str, int], Tensor]]


def evaluate_sets(cfg, ds: Dataset, sets: dict[str, ImageSet], *,
                  reference: Reference | None = None, runner: Runner | None = None,
                  device: str | torch.device = "cpu", progress: bool = True) -> dict[str, EvalResult]:
    """``eval.runs`` runs of every set, each for the epochs of its size (:func:`config_epochs`),
    tested on ``ds``'s test split; ``runner(cfg, ds, sets, jobs, progress=...)`` executes the
    jobs (default :func:`run_jobs`, in this process; launch/evaluate.py passes a Ray one), and
    where they run does not change them."""
    epochs = {m: config_epochs(cfg.eval, len(s.images), len(ds.y_train)) for m, s in sets.items()}
    jobs = [(m, k, epochs[m]) for m in sets for k in range(cfg.eval.runs)]
    if runner is None:
        done = run_jobs(cfg, ds, sets, jobs, device=device, progress=progress)
    else:
        done = runner(cfg, ds, sets, jobs, progress=progress)
    out = {}
    for m, s in sets.items():
        cover = None if reference is None else coverage_of(s.images, reference)
        out[m] = summarize([done[m, k] for k in range(cfg.eval.runs)], reference=reference,
                           coverage=cover, n_images=len(s.images),
                           protocol=Protocol.of(cfg, ds.info, epochs=epochs[m],
                                                augment=s.augment),
                           crop_fill=cfg.eval.crop_fill)
    return out


def evaluate_images(cfg, ds: Dataset, images: Tensor, labels: Tensor, *,
                    is_distilled: Tensor | None = None, augment: str = "combined",
                    reference: Reference | None = None, seed: int | None = None,
                    device: str | torch.device = "cpu", progress: bool = True) -> EvalResult:
    """``cfg.eval.runs`` networks trained on (images, labels) by ``cfg``'s protocol and tested
    on ``ds``'s test split: the report's evaluation of one set (:func:`evaluate_sets`), for
    images from anywhere. ``augment``: the row's augmentation (distill.methods.augment_for)."""
    if reference is not None and tuple(reference.easy.shape) != tuple(ds.y_test.shape):
        raise ValueError(f"reference.easy has shape {tuple(reference.easy.shape)}, the test set "
                         f"has {len(ds.y_test)} samples: build the Reference on this dataset")
    sets = {"images": ImageSet(images, labels, is_distilled, augment=augment, seed=seed)}
    return evaluate_sets(cfg, ds, sets, reference=reference, device=device,
                         progress=progress)["images"]
