"""``data.name: imagefolder``: any folder of class sub-folders as a dataset.

    root/train/<class>/**/*.png|jpg|...     required; one sub-folder per class
    root/val/<class>/**/*.png|jpg|...       optional test split (its classes must exist in train)

Without ``root/val``, ``data.options.val_fraction`` of each class (at random from
``split_seed``) is held out as the test split. Classes are the sorted sub-folder names of
``root/train`` (label k = k-th name; recorded in ``<run_dir>/data.json``); files are taken in
sorted path order, so the dataset order, which difficulty scores index, is stable.

Options (``data.options``):

    image_size    None: every image must already be square and of one size; N: resize to N×N
    channels      3 (RGB; greyscale files are converted) or 1 (greyscale)
    val_fraction  share of each class held out when there is no root/val (default 0.2)
    split_seed    seed of that split (default 0)
    mean, std     per-channel normalisation of [0, 1] pixels; None = computed on the train split
    max_pixels    largest width x height an image file may declare (default 25,000,000: above a
                  4K photo's 8.3 million, far below a decompression bomb's billions)

Each file's header is read before its pixels: an image that declares more than ``max_pixels``
is refused without being decoded (a 140 KB PNG can declare 12000x12000 pixels, 2 GB once
decoded), naming the file and its size. PIL itself refuses any image above twice its
``Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels by default), whatever ``max_pixels`` says; that
refusal names the file too.

A malformed tree raises with the path: no train folder, a class folder without images, an image
that cannot be decoded or is larger than ``max_pixels``, sizes that differ (or a non-square image)
without ``image_size``, a val class unknown to train. Roots are local paths or fsspec URLs;
decoded folders are cached in the process, so validating a config and loading it read the files
once.
"""

from __future__ import annotations

import functools
import logging
import os
import reprlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np

from distill.checks import int_problem
from distill.data_formats import _IMG_EXT, DatasetInfo, DatasetNotFoundError, Options, _Raw

log = logging.getLogger(__name__)

NAME = "imagefolder"
OPTION_DEFAULTS = {"image_size": None, "channels": 3, "val_fraction": 0.2, "split_seed": 0,
                   "mean": None, "std": None, "max_pixels": 25_000_000}


class MalformedFolderError(ValueError):
    """The folder exists but is not a usable dataset; the message names the path."""


HOW = ("set data.root to a folder holding train/<class>/ image files (and optionally "
       "val/<class>/); see distill/imagefolder.py")


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 8
_REPR.maxlevel = 3


def _short(value: Any) -> str:
    """repr() of an option cut to a few dozen characters (a value in a message may be large)."""
    return _REPR.repr(value)


def check_options(opts: Options) -> None:
    """Raise one ValueError listing every bad option (name, value, what is allowed)."""
    problems = []
    size, channels = opts["image_size"], opts["channels"]
    if size is not None and int_problem("image_size", size):
        problems.append(f"image_size must be null or an integer >= 1, got {_short(size)}")
    if channels not in (1, 3) or isinstance(channels, bool):
        problems.append(f"channels must be 1 or 3, got {_short(channels)}")
    frac = opts["val_fraction"]
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
        problems.append(f"val_fraction must be in (0, 1), got {_short(frac)}")
    seed = opts["split_seed"]
    if problem := int_problem("split_seed", seed, 0):
        problems.append(problem)
    if problem := int_problem("max_pixels", opts["max_pixels"]):
        problems.append(f"{problem} (the largest width x height an image may declare)")
    given = [k for k in ("mean", "std") if opts[k] is not None]
    if len(given) == 1:
        problems.append("mean and std must be given together (or both null: computed)")
    for key in given:
        v = opts[key]
        ok = (isinstance(v, (list, tuple)) and len(v) == channels
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))
        if not ok:
            what = (f"a list of {channels} numbers" if channels in (1, 3)
                    else "a list of numbers, one per channel")
            problems.append(f"{key} must be {what}, got {_short(v)}")
        elif key == "std" and min(v) <= 0:
            problems.append(f"std values must be > 0, got {_short(v)}")
    if problems:
        raise ValueError(f"{NAME}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Listing


def _list_split(fs: Any, folder: str, url: str) -> dict[str, list[str]]:
    """class name -> sorted image paths (recursive) of one split folder."""
    classes = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)
                     if fs.isdir(p))
    classes = [c for c in classes if not c.startswith(".")]
    if not classes:
        raise MalformedFolderError(f"{NAME}: {url} has no class sub-folders (expected {url}/<class>/*.png)")
    out = {}
    for c in classes:
        files = sorted(p for p in fs.find(f"{folder}/{c}")
                       if p.lower().endswith(_IMG_EXT)
                       and not p.rsplit("/", 1)[-1].startswith("."))
        if not files:
            raise MalformedFolderError(f"{NAME}: class folder {url}/{c} has no images "
                             f"({', '.join(_IMG_EXT)})")
        out[c] = files
    return out


def _listing(root: str) -> tuple[tuple[str, tuple[str, ...]], tuple[str, tuple[str, ...]] | None]:
    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    if not fs.isdir(f"{base}/train"):
        raise DatasetNotFoundError(f"{NAME}: no train folder at {root.rstrip('/')}/train; {HOW}")
    train = _list_split(fs, f"{base}/train", f"{root.rstrip('/')}/train")
    val = None
    if fs.isdir(f"{base}/val"):
        val = _list_split(fs, f"{base}/val", f"{root.rstrip('/')}/val")
        unknown = sorted(set(val) - set(train))
        if unknown:
            raise MalformedFolderError(f"{NAME}: {root.rstrip('/')}/val/{unknown[0]} is not a class of "
                             f"{root.rstrip('/')}/train (classes: {', '.join(train)})")
    freeze = lambda d: tuple((c, tuple(f)) for c, f in d.items())  # noqa: E731
    return freeze(train), (freeze(val) if val is not None else None)


# --------------------------------------------------------------------------------------------
# Decoding


def _decode(fs: Any, path: str, url: str, mode: str, size: int | None,
            max_pixels: int) -> np.ndarray:
    """One image as uint8 [C, H, W]; its header's size is checked before its pixels are read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with fs.open(path, "rb") as f:
            img = Image.open(f)  # reads the header only
            width, height = img.size
            if width * height > max_pixels:
                raise MalformedFolderError(
                    f"{NAME}: {url} is {width}x{height} = {width * height:,} pixels, more than "
                    f"data.options.max_pixels = {max_pixels:,}; refused before decoding (its "
                    f"pixels would take at least {width * height * 3 / 2**30:.1f} GiB). Shrink "
                    f"or remove the file, or raise data.options.max_pixels if it is a genuine "
                    f"image")
            img.load()
    except MalformedFolderError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        limit = Image.MAX_IMAGE_PIXELS
        raise MalformedFolderError(
            f"{NAME}: {url} refused before decoding by PIL as a possible decompression bomb "
            f"({err}); PIL refuses any image above "
            f"{f'{2 * limit:,}' if limit else 'its'} pixels whatever data.options.max_pixels "
            f"says: shrink or remove the file") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise MalformedFolderError(f"{NAME}: cannot decode image {url} ({err})") from err
    img = img.convert(mode)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _url(root: str, base: str, path: str) -> str:
    """The path as the user wrote the root (a URL keeps its protocol)."""
    return root.rstrip("/") + path[len(base.rstrip("/")):]


def _decode_split(fs: Any, root: str, base: str, paths: list[str], mode: str,
                  size: int | None, max_pixels: int, what: str) -> np.ndarray:
    from PIL import Image
    from tqdm import tqdm

    arrays: list[np.ndarray | None] = [None] * len(paths)

    def one(i: int) -> None:
        arrays[i] = _decode(fs, paths[i], _url(root, base, paths[i]), mode, size, max_pixels)

    with warnings.catch_warnings(), ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1)) as pool:
        # PIL warns (DecompressionBombWarning) when Image.open sees more than MAX_IMAGE_PIXELS;
        # when max_pixels is the lower bound, _decode refuses such an image itself, naming the
        # file and the option, so PIL's anonymous warning is silenced. Set here, in this thread,
        # around the workers: warning filters are process-wide, not per thread.
        if Image.MAX_IMAGE_PIXELS and max_pixels <= Image.MAX_IMAGE_PIXELS:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for _ in tqdm(pool.map(one, range(len(paths))), total=len(paths),
                      desc=f"{NAME} {what}", disable=len(paths) < 2000):
            pass
    first = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != first:
            raise MalformedFolderError(
                f"{NAME}: {_url(root, base, paths[i])} is {a.shape[2]}x{a.shape[1]} but "
                f"{_url(root, base, paths[0])} is {first[2]}x{first[1]}; set "
                f"data.options.image_size to resize every image to one size")
    if first[1] != first[2]:
        raise MalformedFolderError(f"{NAME}: images must be square, {_url(root, base, paths[0])} is "
                         f"{first[2]}x{first[1]}; set data.options.image_size to resize")
    return np.stack(arrays)


def _split(y: np.ndarray, fraction: float, seed: int, root: str,
           names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) indices, each ascending; every class keeps >= 1 of each."""
    rng = np.random.RandomState(seed)
    test = []
    for c in range(len(names)):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            raise MalformedFolderError(f"{NAME}: class folder {root.rstrip('/')}/train/{names[c]} has "
                             f"{len(idx)} image; holding out a test split needs >= 2 per class "
                             f"(or add {root.rstrip('/')}/val/)")
        k = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        test.append(idx[rng.permutation(len(idx))][:k])
    test_idx = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(len(y)), test_idx), test_idx


@functools.lru_cache(maxsize=4)
def _read_cached(root: str, listing: tuple, mode: str, size: int | None, fraction: float,
                 seed: int, max_pixels: int) -> _Raw:
    train, val = listing
    fs, base = fsspec.core.url_to_fs(root)
    names = [c for c, _ in train]
    paths = [p for _, files in train for p in files]
    y = np.concatenate([np.full(len(files), k, dtype=np.int64)
                        for k, (_, files) in enumerate(train)])
    x = _decode_split(fs, root, base, paths, mode, size, max_pixels, "train")
    if val is None:
        tr, te = _split(y, fraction, seed, root, names)
        return _Raw(x[tr], y[tr], x[te], y[te], tuple(names), 255.0)
    index = {c: k for k, c in enumerate(names)}
    vpaths = [p for _, files in val for p in files]
    vy = np.concatenate([np.full(len(files), index[c], dtype=np.int64) for c, files in val])
    vx = _decode_split(fs, root, base, vpaths, mode, size, max_pixels, "val")
    if vx.shape[1:] != x.shape[1:]:
        raise MalformedFolderError(f"{NAME}: val images are {vx.shape[3]}x{vx.shape[2]} but train images "
                         f"are {x.shape[3]}x{x.shape[2]}; set data.options.image_size")
    return _Raw(x, y, vx, vy, tuple(names), 255.0)


def read(root: str, opts: Options) -> _Raw:
    """Decode the folder (cached per root, file listing and options)."""
    check_options(opts)
    mode = "RGB" if opts["channels"] == 3 else "L"
    return _read_cached(root, _listing(root), mode, opts["image_size"],
                        float(opts["val_fraction"]), int(opts["split_seed"]),
                        int(opts["max_pixels"]))


def pixel_stats(x: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of [0, 1] pixels, accumulated in float64 chunks."""
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for start in range(0, len(x), 1024):
        chunk = x[start:start + 1024].astype(np.float64) / scale
        total += chunk.sum(axis=(0, 2, 3))
        squares += (chunk ** 2).sum(axis=(0, 2, 3))
    count = len(x) * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return tuple(map(float, mean)), tuple(map(float, std))


def static(opts: Options, root: str | None):
    """(DatasetInfo, per-class train counts) of the folder: its files are its facts."""
    check_options(opts)
    where = locate([root] if root else [])
    raw = read(where, opts)
    counts = tuple(int(n) for n in np.bincount(raw.y_train, minlength=len(raw.class_names)))
    if opts["mean"] is not None:
        mean, std = tuple(map(float, opts["mean"])), tuple(map(float, opts["std"]))
    else:
        mean, std = pixel_stats(raw.x_train, raw.scale)
        if min(std) == 0:
            raise MalformedFolderError(f"{NAME}: a channel of {where} has zero variance; give "
                             f"data.options.mean and data.options.std")
    info = DatasetInfo(name=NAME, num_classes=len(counts), image_shape=raw.x_train.shape[1:],
                       train_size=len(raw.y_train), test_size=len(raw.y_test),
                       min_class_size=min(counts), mean=mean, std=std,
                       description=f"image folder {where}", how_to_get=HOW)
    return info, counts


def locate(roots: list[str]) -> str:
    if not roots:
        raise DatasetNotFoundError(f"{NAME}: data.root is required; {HOW}")
    root = roots[0]
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.isdir(f"{base.rstrip('/')}/train"):
        raise DatasetNotFoundError(f"{NAME}: no train folder at {root.rstrip('/')}/train; {HOW}")
    return root
