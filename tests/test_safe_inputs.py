"""Inputs that cannot exhaust memory or run code: YAML alias bombs and deep nesting, image files
that declare billions of pixels, CIFAR pickles that name code.

The bombs that would take gigabytes if the guards failed run in a subprocess under a memory
limit; the tests in this process use small bombs (past the bounds, harmless if expanded).
"""

from __future__ import annotations

import os
import pickle
import resource
import struct
import subprocess
import sys
import time
import zlib

import fsspec
import numpy as np
import pytest
import yaml
from PIL import Image, ImageFile

from distill import config_io
from distill.config import ConfigError
from distill.config_io import (MAX_YAML_DEPTH, MAX_YAML_NODES, apply_overrides, dump_yaml,
                               load_config, safe_yaml_load)
from distill.data import load_dataset
from distill.data_formats import _decode_all, _unpickle
from distill.imagefolder import MalformedFolderError, check_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in os.listdir(os.path.join(REPO, "configs")) if p.endswith(".yaml"))


# ---------------------------------------------------------------------------------------------
# YAML


def laughs(levels: int, width: int = 9) -> str:
    """The "billion laughs": ``a: &a [x, ...]``, ``b: &b [*a, ...]``, …: width**levels items."""
    names = "abcdefghijklmnop"
    lines = [f"a: &a [{', '.join(['x'] * width)}]"]
    for prev, name in zip(names, names[1:levels]):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * width)}]")
    return "\n".join(lines) + "\n"


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# RLIMIT_AS (address space) does not fit `import torch` in 3 GB (its CUDA bindings reserve
# address space; the CLI then dies with MemoryError, or OpenBLAS gives up), so the limit is
# RLIMIT_DATA: the process's heap and private mappings, where an expanded bomb would live.
MEMORY_LIMIT = 3 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (MEMORY_LIMIT, MEMORY_LIMIT))


def _cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO,
                         preexec_fn=_limit_memory, capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - start


@pytest.mark.parametrize("case", ["bomb file", "bomb override", "deep file"])
def test_bombs_exit_2_naming_the_bound_under_a_memory_limit(tmp_path, case):
    # 9 levels of 9 aliases: 378 bytes, 9**9 = 387 million items once expanded (7 GB and a minute
    # when the overrides' JSON round-trip expanded it); 20,000 levels: a RecursionError before
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(laughs(9) if case != "deep file" else deep(20_000))
    if case == "bomb override":
        args = ["--config", os.path.join(REPO, "configs", "quickstart.yaml"),
                "--data.options", laughs(9)]
        where, bound = "--data.options", f"MAX_YAML_NODES = {MAX_YAML_NODES:,}"
    else:
        args = ["--config", str(bomb)]
        where = str(bomb)
        bound = (f"MAX_YAML_DEPTH = {MAX_YAML_DEPTH}" if case == "deep file"
                 else f"MAX_YAML_NODES = {MAX_YAML_NODES:,}")
    out, seconds = _cli("config", "show", *args, "--distill.alpha", "0.3")
    assert out.returncode == 2, out.stderr[-2000:]
    assert where in out.stderr and bound in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "MemoryError" not in out.stderr
    assert len(out.stderr) < 2000
    assert seconds < 60  # the CLI's imports (torch) take most of it; the refusal, milliseconds


def test_bounds_are_checked_before_anything_is_expanded():
    # small bombs: past the bounds, harmless if a guard failed and they were expanded
    cases = {
        "laughs": (laughs(5), "MAX_YAML_NODES"),  # 9**5 = 59,049 items
        "merge keys": ("a: &a {" + ", ".join(f"k{i}: {i}" for i in range(9)) + "}\n"
                       + "".join(f"{c}: &{c} {{<<: [{', '.join([f'*{p}'] * 9)}]}}\n"
                                 for p, c in zip("abcd", "bcde")), "MAX_YAML_NODES"),
        "long strings": ("a: &a " + "x" * 200_000 + "\nb: [*a, *a, *a, *a, *a, *a]\n",
                         "MAX_YAML_CHARS"),
        "deep": (deep(20_000), "MAX_YAML_DEPTH"),
        "deep through aliases": ("a: &a " + deep(30) + "\nb: &b " + "[" * 30 + "*a" + "]" * 30
                                 + "\n", "MAX_YAML_DEPTH"),
        "aliases": ("a: &a 1\nb: [" + ", ".join(["*a"] * 1001) + "]\n", "MAX_YAML_ALIASES"),
        "itself": ("a: &a [*a]\n", "refers to itself"),
        "too long": ("x: " + "y" * 1_000_001, "MAX_YAML_CHARS"),
        "nodes": ("[" + ", ".join(["1"] * 10_001) + "]", "MAX_YAML_NODES"),
        "an int of 5,000 digits": ("a: " + "9" * 5000, "cannot be read"),
    }
    for name, (text, bound) in cases.items():
        with pytest.raises(ConfigError) as err:
            safe_yaml_load(text, "F.yaml")
        assert str(err.value).count("F.yaml") == 1 and bound in str(err.value), name
        assert len(str(err.value)) < 600, name


def test_override_values_are_bounded_and_named(tmp_path):
    with pytest.raises(ConfigError, match="--data.options: expands to more than MAX_YAML_NODES"):
        load_config(None, ["--data.options", laughs(5)])
    with pytest.raises(ConfigError, match="--data.options: nested deeper than MAX_YAML_DEPTH"):
        load_config(None, ["--data.options", deep(20_000)])
    # a value that is not YAML stays a string, as before
    assert config_io.parse_overrides(["--run_dir", "a: b: c"]) == {"run_dir": "a: b: c"}


def test_library_values_are_measured_before_the_copy():
    shared = ["x"] * 9
    for _ in range(4):  # 9**5 references to one list, never copied
        shared = [shared] * 9
    with pytest.raises(ConfigError, match="--data.options: expands to more than MAX_YAML_NODES"):
        apply_overrides({}, {"data.options": {"k": shared}})
    loop: list = []
    loop.append(loop)
    with pytest.raises(ConfigError, match="the configuration: refers to itself"):
        apply_overrides({"data": {"options": {"k": loop}}}, {"seed": 1})
    data = {"data": {"options": {"k": [1, 2]}}}
    merged = apply_overrides(data, {"data.options.k": [3]})
    assert merged == {"data": {"options": {"k": [3]}}} and data["data"]["options"]["k"] == [1, 2]


def test_a_large_value_in_a_message_is_cut():
    big = list(range(9000))  # within the bounds: the message shows a few items, not 9000
    with pytest.raises(ConfigError) as err:
        load_config(None, {"data.root": big})
    text = str(err.value)
    assert "data.root must be of type" in text and "..." in text and len(text) < 400


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads_with_the_bounded_loader(name):
    path = os.path.join(REPO, "configs", name)
    text = open(path).read()
    assert safe_yaml_load(text, path) == yaml.safe_load(text)
    cfg = load_config(path, ["--distill.alpha", "0.3"])
    assert safe_yaml_load(dump_yaml(cfg), "resolved") == yaml.safe_load(dump_yaml(cfg))


# ---------------------------------------------------------------------------------------------
# Images


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height zeros: a few KB to 200 KB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    row = b"\0" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * min(1000, height - start))
                    for start in range(0, height, 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.fixture
def no_large_decode(monkeypatch):
    """Decoding an image of more than 10 million pixels fails the test."""
    for cls in (Image.Image, ImageFile.ImageFile):
        original = cls.load

        def load(self, _original=original):
            if self.size[0] * self.size[1] > 10_000_000:
                raise AssertionError(f"decoded a {self.size} image")
            return _original(self)
        monkeypatch.setattr(cls, "load", load)


def _tree(root, big: tuple[int, int] | None = None) -> str | None:
    rng = np.random.RandomState(0)
    for c in ("ant", "bee"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.randint(0, 256, (6, 6, 3), dtype=np.uint8)).save(
                root / "train" / c / f"{i}.png")
    if big is None:
        return None
    path = root / "train" / "bee" / "big.png"
    path.write_bytes(bomb_png(*big))
    return str(path)


@pytest.mark.parametrize("side", [6000, 12000, 40000])
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, side,
                                                                        no_large_decode, recwarn):
    path = _tree(tmp_path, (side, side))
    assert os.path.getsize(path) < 250_000
    with pytest.raises(MalformedFolderError) as err:
        load_dataset("imagefolder", root=str(tmp_path), options={"image_size": 6})
    text = str(err.value)
    assert path in text and "before decoding" in text and len(text) < 600
    if side < 40000:  # our bound: the size and the option that raises it
        assert f"{side}x{side}" in text and "data.options.max_pixels = 25,000,000" in text
    else:  # beyond PIL's own hard limit, which it checks in Image.open
        assert "decompression bomb" in text and "1600000000 pixels" in text
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_max_pixels_is_the_bound_and_is_validated(tmp_path):
    _tree(tmp_path)  # 6x6 = 36 pixels each
    with pytest.raises(MalformedFolderError, match=r"is 6x6 = 36 pixels, more than "
                                                   r"data.options.max_pixels = 35"):
        load_dataset("imagefolder", root=str(tmp_path), options={"max_pixels": 35})
    ds = load_dataset("imagefolder", root=str(tmp_path), options={"max_pixels": 36})
    assert ds.image_shape == (3, 6, 6)
    for bad in (0, "1e9", True, 2.5e7):
        with pytest.raises(ValueError, match="max_pixels must be an integer >= 1, got"):
            check_options({"image_size": None, "channels": 3, "val_fraction": 0.2,
                           "split_seed": 0, "mean": None, "std": None, "max_pixels": bad})
    with pytest.raises(ValueError) as err:  # a large value is cut in the message
        check_options({"image_size": "x" * 10_000, "channels": [3] * 10_000, "val_fraction": 0.2,
                       "split_seed": 0, "mean": [0.5] * 10_000, "std": [1.0] * 3,
                       "max_pixels": 1})
    assert "image_size" in str(err.value) and len(str(err.value)) < 600


@pytest.mark.parametrize("side", [12000, 40000])
def test_a_tiny_imagenet_image_is_size_checked_before_decoding(tmp_path, side, no_large_decode,
                                                               recwarn):
    path = tmp_path / "n01_0.JPEG"
    path.write_bytes(bomb_png(side, side))
    with pytest.raises(ValueError, match="before decoding") as err:
        _decode_all(fsspec.filesystem("file"), [str(path)], "train")
    assert str(path) in str(err.value)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# ---------------------------------------------------------------------------------------------
# CIFAR pickles


class _Payload:
    """Unpickling this calls open(marker, "w"): any code could stand in its place."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _cifar10(folder, batch: dict | None = None, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)

    def write(name: str, obj: dict) -> None:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(pickle.dumps(obj, protocol=protocol))

    for i in range(1, 6):
        write(f"data_batch_{i}", batch if i == 1 and batch is not None else
              {b"batch_label": b"x", b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
               b"labels": [0, 1, 2], b"filenames": [b"a.png", b"b.png", b"c.png"]})
    write("test_batch", {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                         b"labels": [np.int64(3), np.int64(4)]})
    write("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                           b"num_cases_per_batch": 3, b"num_vis": 3072})


def test_a_cifar_batch_that_names_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder, {b"data": _Payload(str(marker)), b"labels": [0]})
    with pytest.raises(ValueError) as err:
        load_dataset("cifar10", root=str(tmp_path))
    text = str(err.value)
    assert str(folder / "data_batch_1") in text and "global io.open" in text
    assert "could run code" in text and "Replace it" in text
    assert not marker.exists()
    # the same file is live: plain pickle would have run it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps({b"data": _Payload(str(control))}))
    assert control.exists()
    # a payload at the top level, or named in Python 2's way, is refused too
    (folder / "test_batch").write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    (folder / "batches.meta").write_bytes(b"c__builtin__\neval\n(S'1'\ntR.")
    for name, refused in (("test_batch", "io.open"), ("batches.meta", "builtins.eval")):
        with pytest.raises(ValueError, match=f"global {refused}"):
            _unpickle(str(folder / name))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_still_load(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    _cifar10(folder, protocol=protocol)
    if protocol == 2:  # the names the original files hold (Python 2, numpy 1)
        for name in os.listdir(folder):
            data = (folder / name).read_bytes()
            (folder / name).write_bytes(data.replace(b"numpy._core.", b"numpy.core."))
        assert b"cnumpy.core.multiarray\n_reconstruct" in (folder / "data_batch_1").read_bytes()
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.y_test.tolist() == [3, 4]
    assert ds.class_names[:2] == ("c0", "c1")
