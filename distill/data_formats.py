"""On-disk dataset formats: IDX (MNIST, Fashion-MNIST), CIFAR pickles, Tiny ImageNet folders.

Each reader takes the folder its locator found (a local path or an fsspec URL) and returns a
`_Raw`: pixels as stored plus labels, in dataset order; :class:`DatasetInfo` holds the static
facts of a dataset. `distill.data` holds the registry that wires these readers to dataset names;
this module must not import it, nor must distill/imagefolder.py (no cycle).
"""

from __future__ import annotations

import gzip
import os
import pickle
import reprlib
import struct
import warnings
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec
import numpy as np


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where we looked; the message says where and how to get them."""


class _Raw(NamedTuple):
    """What a reader returns: pixels as stored (uint8 or float) and labels, in dataset order."""

    x_train: np.ndarray  # [N, C, H, W]; x / scale is in [0, 1]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    scale: float


Options = Mapping[str, Any]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, known without loading it (config validation uses them)."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    train_size: int | None  # None when it depends on options
    test_size: int | None
    min_class_size: int  # fewest TRAIN samples in a class: the largest IPC a selection can take
    mean: tuple[float, ...]  # per channel, of [0, 1] pixels; defines the model input space
    std: tuple[float, ...]
    description: str
    how_to_get: str  # one line: how to make the files available on a machine


# ---------------------------------------------------------------------------------------------
# Locating and fetching files


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _exists(path: str) -> bool:
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def _local_dir(root: str) -> str:
    """Downloads go through torchvision, which writes local files only."""
    if "://" in root and not root.startswith("file://"):
        raise ValueError(f"download needs a local data.root, got {root}")
    path = root.removeprefix("file://")
    os.makedirs(path, exist_ok=True)
    return path


def _find(folder: str, name: str) -> str | None:
    """Path of `name` in `folder`; "stem[.gz]" means stem.gz, else stem. None when missing."""
    names = (name[:-5] + ".gz", name[:-5]) if name.endswith("[.gz]") else (name,)
    return next((_join(folder, n) for n in names if _exists(_join(folder, n))), None)


def _locator(name: str, what: str, subdirs: tuple[str, ...], files: tuple[str, ...],
             how: str) -> Callable[[list[str]], str]:
    """locate() for file datasets: the first of root/<subdir> (per root) that holds all files."""
    def locate(roots: list[str]) -> str:
        looked = [_join(r, d) if d else r for r in roots for d in subdirs]
        for folder in looked:
            if all(_find(folder, f) for f in files):
                return folder
        raise DatasetNotFoundError(f"{name}: no {what} in {' or '.join(looked) or '(no root)'} "
                                   f"(looked for {', '.join(files)}). To get them: {how}.")
    return locate


def _torchvision_fetch(class_name: str) -> Callable[[str], None]:
    def fetch(root: str) -> None:
        local = _local_dir(root)  # fail before the slow import
        import torchvision

        getattr(torchvision.datasets, class_name)(local, train=True, download=True)
    return fetch


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (IDX files)

_IDX = {"train_x": ("train-images-idx3-ubyte[.gz]", 2051),
        "train_y": ("train-labels-idx1-ubyte[.gz]", 2049),
        "test_x": ("t10k-images-idx3-ubyte[.gz]", 2051),
        "test_y": ("t10k-labels-idx1-ubyte[.gz]", 2049)}


def _parse_idx(data: bytes, magic: int, path: str) -> np.ndarray:
    """IDX: big-endian int32 magic (0x08 = uint8, low byte = ndim), ndim int32 sizes, bytes."""
    if len(data) < 8 or struct.unpack(">i", data[:4])[0] != magic:
        found = struct.unpack(">i", data[:4])[0] if len(data) >= 4 else "none"
        raise ValueError(f"{path}: not an IDX file: magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}i", data[4:header])
    if len(data) - header != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says {dims} but holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx(path: str, magic: int) -> np.ndarray:
    with fsspec.open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: not a valid gzip file ({err})") from err
    return _parse_idx(data, magic, path)


def _idx_read(class_names: tuple[str, ...]) -> Callable[[str, Options], _Raw]:
    def read(folder: str, opts: Options) -> _Raw:
        arrays = {key: _read_idx(_find(folder, f) or _join(folder, f), magic)
                  for key, (f, magic) in _IDX.items()}
        for split in ("train", "test"):
            n_x, n_y = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
            if n_x != n_y:
                raise ValueError(f"{folder}: {split} has {n_x} images but {n_y} labels")
        return _Raw(arrays["train_x"][:, None], arrays["train_y"], arrays["test_x"][:, None],
                    arrays["test_y"], class_names, 255.0)
    return read


_IDX_NAMES = tuple(f for f, _ in _IDX.values())


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's python pickle batches)


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: bytes
    names_key: bytes

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


_CIFAR10 = _CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                        "test_batch", "batches.meta", b"labels", b"label_names")
_CIFAR100 = _CifarLayout("cifar-100-python", ("train",), "test", "meta",
                         b"fine_labels", b"fine_label_names")


def _latin1(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as a bytes value needs it (Python 3 writes bytes so in pickle
    protocols 0-2), and nothing else: no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({_short(text)}, {_short(encoding)}) is "
                                     f"not how a pickle writes bytes")
    return text.encode("latin1")


_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"

# The globals a CIFAR pickle may name. The format is a dict of lists, bytes, str and ints, which
# pickle writes with its own opcodes, and one numpy uint8 array, which needs these names (the
# original files, written by Python 2 and numpy 1, name the first three):
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): (f"{_NUMPY_CORE}.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    # the same array as numpy 2 names it, and as pickle protocol 5 writes it
    ("numpy._core.multiarray", "_reconstruct"): (f"{_NUMPY_CORE}.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): (f"{_NUMPY_CORE}.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): (f"{_NUMPY_CORE}.numeric", "_frombuffer"),
    # a numpy number (a label written as numpy.int64)
    ("numpy.core.multiarray", "scalar"): (f"{_NUMPY_CORE}.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): (f"{_NUMPY_CORE}.multiarray", "scalar"),
    ("builtins", "bytearray"): ("builtins", "bytearray"),
}


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = 8
_REPR.maxlevel = 2


def _short(value: Any) -> str:
    """repr() cut to a few dozen characters (a value read from a file may be large)."""
    return _REPR.repr(value)


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that is not part of the CIFAR format."""


class _CifarUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that builds only what the CIFAR format holds: loading a pickle calls
    every function it names, so a crafted batch file could otherwise run any code."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2's names (``__builtin__.bytearray``), as pickle's own find_class maps them
        module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
        if (module, name) == ("_codecs", "encode"):  # bytes in protocols 0-2 (Python 3)
            return _latin1
        if (module, name) not in _CIFAR_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(*_CIFAR_GLOBALS[module, name])


def _unpickle(path: str) -> dict:
    """A CIFAR pickle; a pickle naming anything but the format's types is refused unloaded."""
    try:
        with fsspec.open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise ValueError(
            f"{path}: refused to unpickle: it names the global {str(err):.100}, which is not "
            f"part of the CIFAR format (a CIFAR batch holds numpy arrays, lists, dicts, bytes, "
            f"str and int); loading a pickle calls the functions it names, so this file could "
            f"run code. "
            f"Replace it with the original file from the CIFAR site (or delete the folder and "
            f"set data.download: true)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError) as err:
        raise ValueError(f"{path}: not a CIFAR pickle ({type(err).__name__}: "
                         f"{str(err):.200})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def _cifar_batch(path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: uint8 [N, 3072] row-major CHW data and N labels (any N)."""
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        raise ValueError(f"{path}: needs keys b'data' and {label_key!r}, has "
                         f"{_short(sorted(batch, key=repr))}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: data {data.shape} and {len(labels)} labels; "
                         f"expected [N, 3072] and N labels")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_read(layout: _CifarLayout) -> Callable[[str, Options], _Raw]:
    def read(folder: str, opts: Options) -> _Raw:
        train = [_cifar_batch(_join(folder, f), layout.label_key) for f in layout.train]
        x_test, y_test = _cifar_batch(_join(folder, layout.test), layout.label_key)
        meta = _unpickle(_join(folder, layout.meta))
        names = tuple(n.decode() if isinstance(n, bytes) else str(n)
                      for n in meta.get(layout.names_key, []))
        return _Raw(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                    x_test, y_test, names, 255.0)
    return read


# ---------------------------------------------------------------------------------------------
# Tiny ImageNet (ImageFolder train/ + val/val_annotations.txt), through fsspec

_TINY = "tiny-imagenet-200"
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_NEEDS = ("wnids.txt", "train", "val/val_annotations.txt")
_IMG_EXT = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _tiny_fetch(root: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive
    download_and_extract_archive(_TINY_URL, _local_dir(root))


def _decode_rgb64(fs: Any, path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with fs.open(path, "rb") as f:
            opened = Image.open(f)  # the header only: the size is checked before decoding
            if opened.size != (64, 64):
                raise ValueError(f"{path}: image is {opened.size[0]}x{opened.size[1]}, "
                                 f"expected 64x64 (refused before decoding)")
            img = np.asarray(opened.convert("RGB"))  # greyscale files become RGB
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path}: refused before decoding by PIL as a possible decompression "
                         f"bomb ({err}); a Tiny ImageNet image is 64x64") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot decode image ({err})") from err
    return img


def _decode_all(fs: Any, paths: list[str], what: str) -> np.ndarray:
    """Decode in threads (PIL releases the GIL), keeping the order of `paths`."""
    from PIL import Image
    from tqdm import tqdm

    out = np.empty((len(paths), 64, 64, 3), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = _decode_rgb64(fs, paths[i])

    with warnings.catch_warnings(), ThreadPoolExecutor(
            max_workers=min(8, os.cpu_count() or 1)) as pool:
        # an image large enough for PIL's DecompressionBombWarning is refused by its size
        # (64x64 expected) before decoding, naming the file: PIL's anonymous warning is silenced
        # (set here, around the workers: warning filters are process-wide)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for _ in tqdm(pool.map(one, range(len(paths))), total=len(paths),
                      desc=f"tinyimagenet {what}", disable=len(paths) < 2000):
            pass
    return out.transpose(0, 3, 1, 2)


def _tiny_read(location: str, opts: Options) -> _Raw:
    """ImageFolder order: classes = sorted wnids, files sorted by name within a class.

    The test (val) order is the order of val_annotations.txt.
    """
    fs, base = fsspec.core.url_to_fs(location)
    wnids = sorted(fs.cat_file(f"{base}/wnids.txt").decode().split())
    class_of = {w: i for i, w in enumerate(wnids)}
    train_paths, y_train = [], []
    for i, wnid in enumerate(wnids):
        folder = f"{base}/train/{wnid}/images"
        if not fs.exists(folder):
            raise DatasetNotFoundError(f"tinyimagenet: missing {folder}")
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))
        files = [f"{folder}/{n}" for n in names if n.lower().endswith(_IMG_EXT)]
        train_paths += files
        y_train += [i] * len(files)
    val_paths, y_val = [], []
    for line in fs.cat_file(f"{base}/val/val_annotations.txt").decode().splitlines():
        if not line.strip():
            continue
        fname, wnid = line.split("\t")[:2]
        if wnid not in class_of:
            raise ValueError(f"{location}/val/val_annotations.txt: {wnid} is not in wnids.txt")
        val_paths.append(f"{base}/val/images/{fname}")
        y_val.append(class_of[wnid])
    return _Raw(_decode_all(fs, train_paths, "train"), np.asarray(y_train, dtype=np.int64),
                _decode_all(fs, val_paths, "val"), np.asarray(y_val, dtype=np.int64),
                tuple(wnids), 255.0)
