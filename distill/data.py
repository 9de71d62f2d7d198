"""Dataset registry: every dataset the pipeline can distil, loaded into model input space.

Why a registry: config validation needs static facts (classes, shape, the smallest class for IPC
checks) without reading files, and `selmatch data list` needs a cheap "is it here?" answer. Both
come from `DATASETS`, a dict from name to `DatasetSpec`; an unknown name lists the valid ones.

Contract the other stages build on:
- train and test come back in the dataset's own order, never shuffled: difficulty score files
  (`<run_dir>/scores/<kind>.npy`, shared C-scores, forgetting scores) index into the TRAIN order.
- images are float32 [N, C, H, W], already normalised with `info.mean` / `info.std` (the space the
  synthetic images live in); `Dataset.denormalize` maps back to [0, 1] pixels for image grids.
- `train_per_class=k` keeps the first k samples of each class in dataset order (quick CPU runs);
  `Dataset.train_index` says where each kept sample sits in the full training set. The
  normalisation constants never change with k, so subsets share one input space.
- `Dataset.info` describes what was loaded (sizes counted from the data); `get_info` describes the
  canonical dataset without reading it. They differ only for hand-made files (tests).
- roots are local paths or fsspec URLs (`memory://` in tests) for IDX, CIFAR and Tiny ImageNet.
  With no root, the spec's `default_root` is tried, then `.data/<name>` in the working directory,
  then `.data/<name>` beside the installed package (in a checkout: the checkout's, git-ignored:
  the place to bring files to an offline GPU host). `download=True` uses torchvision, needs a local
  root and internet, and writes to the root given or to `~/.cache/selmatch/<name>`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill import imagefolder
from distill.checks import check_int, int_problem
from distill.data_formats import (
    _CIFAR10,
    DatasetInfo,
    _CIFAR100,
    _IDX_NAMES,
    _TINY,
    _TINY_NEEDS,
    DatasetNotFoundError,
    Options,
    _cifar_read,
    _idx_read,
    _locator,
    _Raw,
    _tiny_fetch,
    _tiny_read,
    _torchvision_fetch,
)

log = logging.getLogger(__name__)

_REPO_DATA = Path(__file__).resolve().parents[1] / ".data"
_CACHE = "~/.cache/selmatch"


class UnknownDatasetError(KeyError, ValueError):
    """A name not in the registry: a KeyError for lookups, a ValueError for config checks."""

    def __str__(self) -> str:  # KeyError would show the repr() of the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test tensors in dataset order, normalised into the model input space."""

    info: DatasetInfo
    x_train: torch.Tensor  # float32 [N, C, H, W], normalised with info.mean/std
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: tuple[str, ...]
    train_index: torch.Tensor | None = None  # int64 [N]: index in the full train set

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.info.image_shape

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kw = {"dtype": x.dtype, "device": x.device}
        mean = torch.tensor(self.info.mean, **kw).view(-1, 1, 1)
        return mean, torch.tensor(self.info.std, **kw).view(-1, 1, 1)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input space back to pixels; not clamped (distilled images may leave [0, 1])."""
        mean, std = self._stats(x)
        return x * std + mean

    def describe(self) -> dict:
        """What labels mean and how images were normalised (``<run_dir>/data.json``)."""
        i = self.info
        return {"name": i.name, "class_names": list(self.class_names), "image_shape":
                list(i.image_shape), "mean": list(i.mean), "std": list(i.std),
                "train_size": len(self.y_train), "test_size": len(self.y_test)}


@dataclass(frozen=True)
class DatasetSpec:
    """How to describe, find and read one dataset; the registry maps names to these."""

    name: str
    static: Callable[[Options, str | None], tuple[DatasetInfo, tuple[int, ...]]]  # (options,
    # located root or None) -> info, per-class sizes; only imagefolder needs the root
    locate: Callable[[list[str]], str]  # candidate roots -> folder; raises DatasetNotFoundError
    read: Callable[[str, Options], _Raw]
    default_root: str | None = None
    fetch: Callable[[str], None] | None = None  # download into a local root; None: impossible
    option_defaults: Mapping[str, Any] = field(default_factory=dict)
    flip_invariant: bool = False  # a mirrored image is the same class: the crop + flip of real
    # rows (eval.flip) mirrors only such data. Photographs (CIFAR, Tiny ImageNet) and clothes
    # (Fashion-MNIST) are; digits are not (a mirrored 2 or 7 is another shape, or none), and
    # generated or unknown images (synthetic, imagefolder) are not assumed to be.

    def options(self, options: Options | None) -> dict[str, Any]:
        """Defaults merged with `options`; unknown keys raise ValueError naming the allowed ones."""
        given = dict(options or {})
        unknown = sorted(set(given) - set(self.option_defaults))
        if unknown:
            allowed = ", ".join(sorted(self.option_defaults)) or "none"
            raise ValueError(f"{self.name}: unknown option(s) {', '.join(unknown)}; "
                             f"allowed: {allowed}")
        return {**self.option_defaults, **given}

    def info(self, options: Options | None = None, *, train_per_class: int | None = None,
             root: str | None = None) -> DatasetInfo:
        info, counts = self.static(self.options(options), root)
        if train_per_class is None:
            return info
        kept = [min(_check_k(train_per_class), c) for c in counts]
        return replace(info, train_size=sum(kept), min_class_size=min(kept))

    def roots(self, root: str | None) -> list[str]:
        if root is not None:
            return [_expand(root)]
        if self.default_root is None:
            return []
        here = [str(Path.cwd() / ".data" / self.name), str(_REPO_DATA / self.name)]
        return [_expand(self.default_root), *dict.fromkeys(here)]

    def status(self, root: str | None = None) -> tuple[bool, str]:
        """(available here?, where it is or why not), by checking files exist."""
        try:
            return True, self.locate(self.roots(root))
        except DatasetNotFoundError as err:
            return False, str(err)

    def load(self, root: str | None = None, download: bool = False,
             options: Options | None = None, *, train_per_class: int | None = None) -> Dataset:
        opts = self.options(options)
        if train_per_class is not None:
            _check_k(train_per_class)
        try:
            where = self.locate(self.roots(root))
        except DatasetNotFoundError:
            if not download or self.fetch is None:
                raise
            target = _expand(root if root is not None else f"{_CACHE}/{self.name}")
            log.info("%s: downloading into %s", self.name, target)
            try:
                self.fetch(target)
            except (OSError, RuntimeError, EOFError) as err:  # network (URLError is an
                # OSError), http, integrity and archive errors; a ValueError (e.g. a root that is
                # not local) is a configuration problem and keeps its own message
                raise DatasetNotFoundError(
                    f"{self.name}: data.download could not fetch the files into {target} "
                    f"({type(err).__name__}: {err}). Without internet, bring the files and set "
                    f"data.root instead: {self.info(opts).how_to_get}") from err
            where = self.locate([target])
        info = self.info(opts, root=where)
        log.info("%s: reading %s", self.name, where)
        return _assemble(info, self.read(where, opts), train_per_class)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _check_k(k: int) -> int:
    return check_int("train_per_class", k)


def _expand(root: str) -> str:
    return root if "://" in root else os.path.expanduser(root)


def _pixel_stats(x: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of [0, 1] pixels."""
    pixels = x.astype(np.float64) / scale
    axes = (0, 2, 3)
    return tuple(map(float, pixels.mean(axes))), tuple(map(float, pixels.std(axes)))


def _first_per_class(y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the first k samples of each class, ascending (dataset order kept)."""
    keep = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        keep[np.flatnonzero(y == c)[:k]] = True
    return np.flatnonzero(keep)


def _check_raw(info: DatasetInfo, raw: _Raw) -> None:
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        if x.ndim != 4 or tuple(x.shape[1:]) != info.image_shape or len(x) != len(y):
            raise ValueError(f"{info.name} {split}: images {tuple(x.shape)} and {len(y)} labels "
                             f"do not fit image shape {info.image_shape}")
        if len(y) and (y.min() < 0 or y.max() >= info.num_classes):
            raise ValueError(f"{info.name} {split}: labels must be in 0..{info.num_classes - 1}, "
                             f"got {int(y.min())}..{int(y.max())}")


def _to_model_space(x: np.ndarray, scale: float, info: DatasetInfo) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).div_(scale)
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    return t.sub_(mean).div_(torch.tensor(info.std).view(-1, 1, 1))


def _assemble(info: DatasetInfo, raw: _Raw, train_per_class: int | None) -> Dataset:
    """Subset (before converting, to save memory), normalise and count what was loaded."""
    _check_raw(info, raw)
    x_train, y_train = raw.x_train, raw.y_train
    index = np.arange(len(y_train))
    if train_per_class is not None:
        index = _first_per_class(y_train, train_per_class)
        x_train, y_train = x_train[index], y_train[index]
    counts = np.bincount(y_train, minlength=info.num_classes)
    info = replace(info, train_size=len(y_train), test_size=len(raw.y_test),
                   min_class_size=int(counts.min()))
    return Dataset(info=info,
                   x_train=_to_model_space(x_train, raw.scale, info),
                   y_train=torch.from_numpy(y_train.astype(np.int64)),
                   x_test=_to_model_space(raw.x_test, raw.scale, info),
                   y_test=torch.from_numpy(raw.y_test.astype(np.int64)),
                   class_names=tuple(raw.class_names),
                   train_index=torch.from_numpy(index.astype(np.int64)))


def _measured(name: str, raw: _Raw, description: str,
              how: str) -> tuple[DatasetInfo, tuple[int, ...]]:
    """Info of a small generated or embedded dataset, normalisation measured on its train split."""
    mean, std = _pixel_stats(raw.x_train, raw.scale)
    counts = tuple(int(n) for n in np.bincount(raw.y_train, minlength=len(raw.class_names)))
    info = DatasetInfo(name=name, num_classes=len(counts), image_shape=raw.x_train.shape[1:],
                       train_size=len(raw.y_train), test_size=len(raw.y_test),
                       min_class_size=min(counts), mean=mean, std=std, description=description,
                       how_to_get=how)
    return info, counts


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn, embedded)


@functools.lru_cache(maxsize=1)
def _digits_raw() -> _Raw:
    """scikit-learn's 8x8 digits with a fixed stratified 80/20 split.

    Exactly: one generator `numpy.random.RandomState(0)`, created once; for each class c in
    ascending order, `idx_c` = that class's indices in dataset order and
    `perm = idx_c[rng.permutation(len(idx_c))]`; the first `round(0.2 * len(idx_c))` of `perm`
    go to test. Train = the remaining indices ascending; test = the test indices ascending.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None]  # values 0..16
    y = bunch.target.astype(np.int64)
    rng = np.random.RandomState(0)
    test_parts = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        perm = idx[rng.permutation(len(idx))]
        test_parts.append(perm[:int(round(0.2 * len(idx)))])
    test = np.sort(np.concatenate(test_parts))
    train = np.setdiff1d(np.arange(len(y)), test)
    return _Raw(x[train], y[train], x[test], y[test], tuple(str(c) for c in range(10)), 16.0)


@functools.lru_cache(maxsize=1)
def _digits_static() -> tuple[DatasetInfo, tuple[int, ...]]:
    return _measured("digits", _digits_raw(), "scikit-learn 8x8 handwritten digits, fixed "
                     "stratified 80/20 split", "embedded in scikit-learn (nothing to install)")


# ---------------------------------------------------------------------------------------------
# synthetic (generated, for tests)

_SYN_DEFAULTS = {"num_classes": 3, "per_class": 20, "test_per_class": 10, "image_size": 8,
                 "channels": 1, "seed": 0}


@functools.lru_cache(maxsize=8)
def _synthetic_raw(num_classes: int, per_class: int, test_per_class: int, image_size: int,
                   channels: int, seed: int) -> _Raw:
    """Prototype per class + Gaussian noise whose level grows with the sample's rank in its
    class (0.05 to 0.5), so difficulty varies. Sample j is class j % K: classes interleave, and
    code that assumes class blocks fails."""
    rng = np.random.RandomState(seed)
    shape = (channels, image_size, image_size)
    protos = rng.uniform(0.2, 0.8, size=(num_classes, *shape))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        j = np.arange(n * num_classes)
        y, rank = j % num_classes, j // num_classes
        level = 0.05 + 0.45 * rank / max(n - 1, 1)
        x = protos[y] + level[:, None, None, None] * rng.standard_normal((len(j), *shape))
        return np.clip(x, 0.0, 1.0).astype(np.float32), y.astype(np.int64)

    x_train, y_train = split(per_class)
    x_test, y_test = split(test_per_class)
    names = tuple(f"class_{c}" for c in range(num_classes))
    return _Raw(x_train, y_train, x_test, y_test, names, 1.0)


def _synthetic_static(opts: Options) -> tuple[DatasetInfo, tuple[int, ...]]:
    for key, value in opts.items():
        problem = int_problem(f"option {key}", value, 0 if key == "seed" else 1)
        if problem:
            raise ValueError(f"synthetic: {problem}")
    return _measured("synthetic", _synthetic_raw(**opts), "generated prototype + noise "
                     "images, classes interleaved (tests)", "generated from data.options")


# ---------------------------------------------------------------------------------------------
# Registry

_INTERNET = "or set data.download: true on a machine with internet"
_HOW = {
    "fashion_mnist": "install them with `apt-get install -y dataset-fashion-mnist`, or set "
                     f"data.root to a folder with the four IDX files, {_INTERNET}",
    "mnist": f"set data.root to a folder with the four MNIST IDX files, {_INTERNET}",
    "cifar10": f"unpack cifar-10-python.tar.gz into data.root, {_INTERNET}",
    "cifar100": f"unpack cifar-100-python.tar.gz into data.root, {_INTERNET}",
    "tinyimagenet": f"unzip tiny-imagenet-200.zip into data.root, {_INTERNET}",
}
_FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
_MNIST_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)


def _on_disk(name: str, *, counts: tuple[int, ...], shape: tuple[int, int, int],
             mean: tuple[float, ...], std: tuple[float, ...], description: str, what: str,
             subdirs: tuple[str, ...], files: tuple[str, ...], read: Callable,
             fetch: Callable[[str], None], flip_invariant: bool,
             default_root: str | None = None) -> DatasetSpec:
    """A file dataset whose facts are published constants, so get_info reads nothing."""
    info = DatasetInfo(name=name, num_classes=len(counts), image_shape=shape,
                       train_size=sum(counts), test_size=10_000, min_class_size=min(counts),
                       mean=mean, std=std, description=description, how_to_get=_HOW[name])
    return DatasetSpec(name, lambda opts, root: (info, counts),
                       _locator(name, what, subdirs, files, _HOW[name]), read,
                       default_root=default_root or f"{_CACHE}/{name}", fetch=fetch,
                       flip_invariant=flip_invariant)


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", lambda opts, root: _digits_static(),
                          lambda roots: "embedded in scikit-learn",
                          lambda where, opts: _digits_raw()),
    "synthetic": DatasetSpec("synthetic", lambda opts, root: _synthetic_static(opts),
                             lambda roots: "generated in memory",
                             lambda where, opts: _synthetic_raw(**opts),
                             option_defaults=_SYN_DEFAULTS),
    "mnist": _on_disk(
        "mnist", counts=_MNIST_COUNTS, shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
        description="MNIST handwritten digits", what="IDX files", subdirs=("", "MNIST/raw"),
        files=_IDX_NAMES, read=_idx_read(tuple("0123456789")),
        fetch=_torchvision_fetch("MNIST"), flip_invariant=False),
    "fashion_mnist": _on_disk(
        "fashion_mnist", counts=(6000,) * 10, shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,),
        description="Zalando Fashion-MNIST clothing images", what="IDX files",
        subdirs=("", "FashionMNIST/raw"), files=_IDX_NAMES, read=_idx_read(_FASHION_NAMES),
        fetch=_torchvision_fetch("FashionMNIST"), flip_invariant=True,
        default_root="/usr/share/datasets/fashion-mnist"),
    "cifar10": _on_disk(
        "cifar10", counts=(5000,) * 10, shape=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465),
        std=(0.2023, 0.1994, 0.2010), description="CIFAR-10 32x32 colour images",
        what=f"{_CIFAR10.folder} files", subdirs=(_CIFAR10.folder, ""), files=_CIFAR10.files,
        read=_cifar_read(_CIFAR10), fetch=_torchvision_fetch("CIFAR10"),
        flip_invariant=True),
    "cifar100": _on_disk(
        "cifar100", counts=(500,) * 100, shape=(3, 32, 32), mean=(0.5071, 0.4866, 0.4409),
        std=(0.2673, 0.2564, 0.2762), description="CIFAR-100 32x32 colour images, fine labels",
        what=f"{_CIFAR100.folder} files", subdirs=(_CIFAR100.folder, ""),
        files=_CIFAR100.files, read=_cifar_read(_CIFAR100), fetch=_torchvision_fetch("CIFAR100"),
        flip_invariant=True),
    "tinyimagenet": _on_disk(
        "tinyimagenet", counts=(500,) * 200, shape=(3, 64, 64), mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262), description="Tiny ImageNet 64x64, 200 classes; val = test",
        what=_TINY, subdirs=(_TINY, ""), files=_TINY_NEEDS, read=_tiny_read, fetch=_tiny_fetch,
        flip_invariant=True),
    "imagefolder": DatasetSpec("imagefolder", lambda opts, root: imagefolder.static(opts, root),
                               imagefolder.locate, imagefolder.read,
                               option_defaults=imagefolder.OPTION_DEFAULTS),
}


def register_dataset(name: str, read: Callable[[], tuple], *, class_names: tuple[str, ...],
                     flip_invariant: bool = False, description: str = "",
                     replace_existing: bool = False) -> None:
    """Add a dataset to :data:`DATASETS` (in this process): ``read()`` returns ``(x_train,
    y_train, x_test, y_test)`` as arrays, images ``[N, C, H, W]`` of pixels in [0, 1] (float)
    or [0, 255] (uint8), labels ``0 .. len(class_names) - 1``, in the order difficulty scores
    will index. Read once per process; normalised with its training split's mean and std."""
    if name in DATASETS and not replace_existing:
        raise ValueError(f"dataset {name!r} is registered already (replace_existing=True "
                         f"replaces it); registered: {', '.join(dataset_names())}")

    @functools.lru_cache(maxsize=1)
    def raw() -> _Raw:
        x_train, y_train, x_test, y_test = (np.asarray(a) for a in read())
        scale = 255.0 if x_train.dtype == np.uint8 else 1.0
        return _Raw(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64),
                    tuple(class_names), scale)

    DATASETS[name] = DatasetSpec(
        name, lambda opts, root: _measured(name, raw(), description or f"registered: {name}",
                                           "registered in this process (register_dataset)"),
        lambda roots: "registered in this process", lambda where, opts: raw(),
        flip_invariant=flip_invariant)


def flip_invariant(name: str) -> bool:
    """Whether a horizontally mirrored image of dataset ``name`` keeps its class (the default
    of ``eval.flip``)."""
    return get_spec(name).flip_invariant


def dataset_names() -> list[str]:
    """Registered names, sorted."""
    return sorted(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise UnknownDatasetError(f"unknown dataset {name!r}; valid: "
                                  f"{', '.join(dataset_names())}") from None


def get_info(name: str, *, train_per_class: int | None = None, options: Options | None = None,
             root: str | None = None) -> DatasetInfo:
    """Static facts without reading files (digits and synthetic are generated: instant), except
    for imagefolder, whose facts are its files (``root`` required, decoded once per process)."""
    return get_spec(name).info(options, train_per_class=train_per_class, root=root)


def load_dataset(name: str, *, root: str | None = None, download: bool = False,
                 train_per_class: int | None = None, options: Options | None = None) -> Dataset:
    """Load train and test in dataset order, normalised; see the module docstring."""
    return get_spec(name).load(root, download, options, train_per_class=train_per_class)


def dataset_status(name: str, root: str | None = None) -> tuple[bool, str]:
    """(available here?, where it is or why not); checks that files exist, reads nothing."""
    return get_spec(name).status(root)


def load_configured(data_cfg) -> Dataset:
    """The dataset described by a ``DataConfig`` (name, root, download, subset, options)."""
    return load_dataset(data_cfg.name, root=data_cfg.root, download=data_cfg.download,
                        train_per_class=data_cfg.train_per_class, options=data_cfg.options)
