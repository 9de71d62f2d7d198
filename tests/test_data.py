"""Tests for the dataset registry (distill/data.py).

Real data is used where this machine has it (scikit-learn digits, the Debian Fashion-MNIST
files); every other format is tested on small files written here in the real on-disk format, so
the loaders that cannot be exercised on real data still read what torchvision would download.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import uuid

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from distill import data
from distill.data import DatasetNotFoundError, dataset_status, get_info, load_dataset

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
ALL_NAMES = {"digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "cifar100",
             "tinyimagenet", "imagefolder"}


def _pixels(ds: data.Dataset, x: torch.Tensor, scale: float) -> np.ndarray:
    """Model-space images back to stored integer pixels."""
    return np.rint(ds.denormalize(x).double().numpy() * scale).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_lists_all_datasets():
    assert set(data.dataset_names()) == ALL_NAMES
    assert set(data.DATASETS) == ALL_NAMES
    assert data.dataset_names() == sorted(ALL_NAMES)


def test_unknown_name_lists_valid_names():
    for exc in (KeyError, ValueError):
        with pytest.raises(exc) as err:
            get_info("cifar-10")
        assert "cifar-10" in str(err.value)
        assert all(name in str(err.value) for name in ALL_NAMES)
    with pytest.raises(KeyError):
        load_dataset("imagenet")


def test_unknown_options_and_bad_subset_raise():
    with pytest.raises(ValueError, match="num_classes"):  # the allowed keys are listed
        get_info("synthetic", options={"classes": 3})
    with pytest.raises(ValueError, match="allowed: none"):
        get_info("fashion_mnist", options={"per_class": 3})
    with pytest.raises(ValueError, match="image_size"):
        get_info("synthetic", options={"image_size": 0})
    with pytest.raises(ValueError, match="train_per_class"):
        get_info("digits", train_per_class=0)


def test_static_info_needs_no_files():
    c100 = get_info("cifar100")
    assert (c100.num_classes, c100.image_shape, c100.min_class_size) == (100, (3, 32, 32), 500)
    assert (c100.train_size, c100.test_size) == (50_000, 10_000)
    assert get_info("cifar10").min_class_size == 5000
    tiny = get_info("tinyimagenet")
    assert (tiny.num_classes, tiny.image_shape, tiny.train_size) == (200, (3, 64, 64), 100_000)
    mnist = get_info("mnist", train_per_class=5500)  # smallest MNIST class has 5,421
    assert mnist.min_class_size == 5421 and mnist.train_size == 54_921
    assert get_info("fashion_mnist", train_per_class=10).train_size == 100
    for name in ALL_NAMES - {"imagefolder"}:  # an image folder's facts are its files
        info = get_info(name)
        assert len(info.mean) == len(info.std) == info.image_shape[0]
        assert info.how_to_get and info.description
    with pytest.raises(DatasetNotFoundError, match="data.root is required"):
        get_info("imagefolder")


# ---------------------------------------------------------------------------------------------
# digits


def _expected_digits_split() -> tuple[np.ndarray, np.ndarray]:
    """The split exactly as documented in data._digits_raw, written out independently."""
    from sklearn.datasets import load_digits

    y = load_digits().target
    rng = np.random.RandomState(0)
    test = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test += list(idx[rng.permutation(len(idx))][:round(0.2 * len(idx))])
    test = np.sort(np.array(test))
    return np.setdiff1d(np.arange(len(y)), test), test


def test_digits_split_is_stratified_and_pinned():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_train.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64 and ds.num_classes == 10 and ds.name == "digits"
    train_counts = np.bincount(ds.y_train.numpy(), minlength=10)
    test_counts = np.bincount(ds.y_test.numpy(), minlength=10)
    assert (train_counts > 0).all() and (test_counts > 0).all()
    assert np.allclose(test_counts / (train_counts + test_counts), 0.2, atol=0.01)
    assert ds.info.min_class_size == train_counts.min() == get_info("digits").min_class_size
    assert abs(ds.x_train.mean().item()) < 1e-4 and abs(ds.x_train.std().item() - 1) < 1e-3

    bunch = load_digits()
    train, test = _expected_digits_split()
    assert np.array_equal(ds.train_index.numpy(), np.arange(len(train)))
    assert np.array_equal(ds.y_train.numpy(), bunch.target[train])
    assert np.array_equal(ds.y_test.numpy(), bunch.target[test])
    assert np.array_equal(_pixels(ds, ds.x_test, 16)[:, 0], bunch.images[test].astype(np.int64))

    again = data._digits_raw.__wrapped__()  # bypass the cache: the split is recomputed
    assert np.array_equal(again.y_train, ds.y_train.numpy())
    assert np.array_equal(_pixels(ds, ds.x_train, 16), again.x_train.astype(np.int64))


def test_digits_train_per_class_keeps_dataset_order():
    full = load_dataset("digits")
    sub = load_dataset("digits", train_per_class=5)
    y = full.y_train.numpy()
    expected = np.sort(np.concatenate([np.flatnonzero(y == c)[:5] for c in range(10)]))
    assert np.array_equal(sub.train_index.numpy(), expected)
    assert torch.equal(sub.x_train, full.x_train[expected])
    assert torch.equal(sub.y_train, full.y_train[expected])
    assert torch.equal(sub.x_test, full.x_test)
    assert sub.info.train_size == 50 and sub.info.min_class_size == 5
    assert sub.info == get_info("digits", train_per_class=5)
    assert sub.info.mean == full.info.mean  # one input space for every subset

    big = get_info("digits", train_per_class=150)  # above the smallest class
    counts = np.bincount(y, minlength=10)
    assert big.min_class_size == min(150, counts.min())
    assert big.train_size == np.minimum(counts, 150).sum()


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)


@pytest.mark.skipif(not os.path.isdir(FMNIST_DIR),
                    reason=f"{FMNIST_DIR} missing: apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_real_files():
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60_000, 1, 28, 28) and ds.x_test.shape == (10_000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert np.array_equal(np.bincount(ds.y_train.numpy()), [6000] * 10)
    assert np.array_equal(np.bincount(ds.y_test.numpy()), [1000] * 10)
    assert ds.class_names[0] == "T-shirt/top" and len(ds.class_names) == 10
    assert abs(ds.x_train.mean().item()) < 0.01 and abs(ds.x_train.std().item() - 1) < 0.01
    assert ds.info == get_info("fashion_mnist")


def _write_idx(path, array: np.ndarray, magic: int, gz: bool) -> None:
    raw = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    with open(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(gzip.compress(raw) if gz else raw)


def _write_idx_set(folder, rng, n_train=13, n_test=7, gz=(True, True, False, False)):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": (rng.integers(0, 256, (n_train, 28, 28)), 2051),
              "train-labels-idx1-ubyte": (np.arange(n_train) % 10, 2049),
              "t10k-images-idx3-ubyte": (rng.integers(0, 256, (n_test, 28, 28)), 2051),
              "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10, 2049)}
    for (name, (array, magic)), zipped in zip(arrays.items(), gz):
        _write_idx(folder / name, array, magic, zipped)
    return {name: array for name, (array, _) in arrays.items()}


@pytest.mark.parametrize("gz", [(True,) * 4, (False,) * 4, (True, False, False, True)])
def test_idx_loader_reads_gz_and_raw(tmp_path, gz):
    arrays = _write_idx_set(tmp_path, np.random.default_rng(0), gz=gz)
    ds = load_dataset("mnist", root=str(tmp_path))
    assert ds.x_train.shape == (13, 1, 28, 28) and ds.x_test.shape == (7, 1, 28, 28)
    assert np.array_equal(ds.y_train.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert np.array_equal(_pixels(ds, ds.x_train, 255)[:, 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(_pixels(ds, ds.x_test, 255)[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert ds.info.train_size == 13 and ds.info.min_class_size == 1  # counted from the files


def test_idx_loader_finds_torchvision_layout(tmp_path):
    _write_idx_set(tmp_path / "FashionMNIST" / "raw", np.random.default_rng(1))
    assert dataset_status("fashion_mnist", str(tmp_path)) == (
        True, f"{tmp_path}/FashionMNIST/raw")
    ds = load_dataset("fashion_mnist", root=str(tmp_path), train_per_class=1)
    assert ds.train_index.tolist() == list(range(10))


def test_idx_corrupt_files_raise_value_error_naming_the_file(tmp_path):
    _write_idx_set(tmp_path, np.random.default_rng(0), gz=(False,) * 4)
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((13, 28, 28)), 2049, gz=False)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*magic number 2049"):
        load_dataset("mnist", root=str(tmp_path))
    with open(tmp_path / "train-images-idx3-ubyte", "wb") as f:  # header says more than it holds
        f.write(struct.pack(">4i", 2051, 13, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", root=str(tmp_path))
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((12, 28, 28)), 2051, gz=False)
    with pytest.raises(ValueError, match="13 labels"):
        load_dataset("mnist", root=str(tmp_path))


def test_missing_idx_dir_says_where_and_how(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist", root=str(missing))
    assert isinstance(err.value, FileNotFoundError)
    assert str(missing) in str(err.value) and "apt-get install" in str(err.value)
    assert "train-images-idx3-ubyte[.gz]" in str(err.value)
    ok, why = dataset_status("fashion_mnist", str(missing))
    assert not ok and str(missing) in why


def test_download_needs_a_local_root():
    with pytest.raises(ValueError, match="local data.root"):
        load_dataset("mnist", root="memory://selmatch-no-such-dir", download=True)


# ---------------------------------------------------------------------------------------------
# CIFAR


def _pickle_to(path: str, obj: dict) -> None:
    with fsspec.open(path, "wb") as f:
        pickle.dump(obj, f)


def _write_cifar10(folder: str, rng, rows=(4, 3, 5, 2, 4), n_test=6) -> dict:
    """The torchvision layout: five data_batch_i files, test_batch, batches.meta."""
    out = {"x": [], "y": []}
    for i, n in enumerate(rows, start=1):
        x, y = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        _pickle_to(f"{folder}/data_batch_{i}", {b"batch_label": b"x", b"data": x, b"labels": y})
        out["x"].append(x)
        out["y"] += y
    out["x_test"] = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    out["y_test"] = rng.integers(0, 10, n_test).tolist()
    _pickle_to(f"{folder}/test_batch", {b"data": out["x_test"], b"labels": out["y_test"]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    _pickle_to(f"{folder}/batches.meta", {b"label_names": names, b"num_cases_per_batch": 4})
    out["x"] = np.concatenate(out["x"])
    return out


def test_cifar10_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    written = _write_cifar10(str(folder), np.random.default_rng(0))
    for root in (tmp_path, folder):  # the parent or the batches folder itself
        ds = load_dataset("cifar10", root=str(root))
        assert ds.x_train.shape == (18, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
        assert ds.y_train.tolist() == written["y"] and ds.y_test.tolist() == written["y_test"]
        assert np.array_equal(_pixels(ds, ds.x_train, 255).reshape(18, -1), written["x"])
        assert np.array_equal(_pixels(ds, ds.x_test, 255).reshape(6, -1), written["x_test"])
        assert ds.class_names[:2] == ("airplane", "automobile")
    # a single CHW pixel lands where torchvision puts it: red plane first
    assert _pixels(ds, ds.x_train, 255)[0, 1, 0, 0] == written["x"][0, 1024]


def test_cifar10_missing_batch_is_not_found(tmp_path):
    _write_cifar10(str(tmp_path), np.random.default_rng(0))
    os.remove(tmp_path / "data_batch_5")
    with pytest.raises(DatasetNotFoundError, match="data_batch_5"):
        load_dataset("cifar10", root=str(tmp_path))
    assert dataset_status("cifar10", str(tmp_path))[0] is False


def test_cifar100_on_memory_filesystem():
    root = f"memory://selmatch-test-{uuid.uuid4().hex}"
    folder = f"{root}/cifar-100-python"
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (9, 3072), dtype=np.uint8), [99, 0, 5, 5, 42, 1, 0, 3, 98]
    x_test = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    try:
        _pickle_to(f"{folder}/train", {b"data": x, b"fine_labels": y, b"coarse_labels": [0] * 9})
        _pickle_to(f"{folder}/test", {b"data": x_test, b"fine_labels": [7, 8, 9, 10],
                                      b"coarse_labels": [1] * 4})
        names = [f"class{i}".encode() for i in range(100)]
        _pickle_to(f"{folder}/meta", {b"fine_label_names": names, b"coarse_label_names": []})
        assert dataset_status("cifar100", root) == (True, folder)
        ds = load_dataset("cifar100", root=root, train_per_class=1)
        assert ds.train_index.tolist() == [0, 1, 2, 4, 5, 7, 8]  # first of each class, in order
        assert ds.y_train.tolist() == [99, 0, 5, 42, 1, 3, 98]
        assert np.array_equal(_pixels(ds, ds.x_train, 255).reshape(7, -1), x[ds.train_index])
        assert ds.y_test.tolist() == [7, 8, 9, 10] and ds.class_names[99] == "class99"
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_cifar_bad_pickle_raises(tmp_path):
    _write_cifar10(str(tmp_path), np.random.default_rng(0))
    _pickle_to(str(tmp_path / "data_batch_2"), {b"data": np.zeros((2, 100), np.uint8),
                                                b"labels": [0, 1]})
    with pytest.raises(ValueError, match="data_batch_2"):
        load_dataset("cifar10", root=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Tiny ImageNet


def _write_tiny(base) -> dict:
    """3 classes x 4 train images, 5 val images; each image's grey level encodes its identity."""
    wnids = ["n03", "n01", "n02"]  # not sorted on purpose
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    level = {}
    for ci, wnid in enumerate(wnids):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for fi, stem in enumerate(["d", "b", "a", "c"]):  # written out of order
            value = 10 * (ci + 1) + fi
            level[f"{wnid}/{stem}"] = value
            mode = "L" if (ci, fi) == (0, 0) else "RGB"  # one greyscale file
            color = value if mode == "L" else (value, value + 100, value + 50)
            Image.new(mode, (64, 64), color).save(images / f"{wnid}_{stem}.JPEG", format="PNG")
    (base / "val" / "images").mkdir(parents=True)
    ann = []
    for i, wnid in enumerate(["n02", "n03", "n01", "n01", "n02"]):
        Image.new("RGB", (64, 64), (200 + i, 0, 0)).save(base / "val" / "images" / f"val_{i}.JPEG")
        ann.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return level


def test_tinyimagenet_imagefolder_order(tmp_path):
    level = _write_tiny(tmp_path / "tiny-imagenet-200")
    ds = load_dataset("tinyimagenet", root=str(tmp_path))
    assert ds.class_names == ("n01", "n02", "n03")  # sorted wnids = ImageFolder order
    assert ds.x_train.shape == (12, 3, 64, 64) and ds.x_test.shape == (5, 3, 64, 64)
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    pixels = _pixels(ds, ds.x_train, 255)
    expected = [level[f"{w}/{s}"] for w in ("n01", "n02", "n03") for s in "abcd"]
    assert pixels[:, 0, 0, 0].tolist() == expected  # files sorted by name within a class
    grey = pixels[8 + 3]  # n03_d: the greyscale file, now three equal channels
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()
    assert ds.y_test.tolist() == [1, 2, 0, 0, 1]  # from val_annotations.txt, in its order
    red = _pixels(ds, ds.x_test, 255)[:, 0, 32, 32]
    assert np.all(np.abs(red - np.arange(200, 205)) <= 3)  # real (lossy) JPEGs
    assert dataset_status("tinyimagenet", str(tmp_path / "tiny-imagenet-200"))[0]


def test_tinyimagenet_through_fsspec(tmp_path):
    _write_tiny(tmp_path / "tiny-imagenet-200")
    mem, root = fsspec.filesystem("memory"), f"selmatch-tiny-{uuid.uuid4().hex}"
    try:
        for path in tmp_path.rglob("*"):
            if path.is_file():
                mem.pipe(f"/{root}/{path.relative_to(tmp_path)}", path.read_bytes())
        remote = load_dataset("tinyimagenet", root=f"memory://{root}")
        local = load_dataset("tinyimagenet", root=str(tmp_path))
        assert torch.equal(remote.x_train, local.x_train)
        assert torch.equal(remote.y_test, local.y_test)
    finally:
        mem.rm(f"/{root}", recursive=True)


def test_tinyimagenet_wrong_size_raises(tmp_path):
    _write_tiny(tmp_path)
    Image.new("RGB", (32, 32)).save(tmp_path / "train" / "n01" / "images" / "n01_a.JPEG")
    with pytest.raises(ValueError, match="n01_a.JPEG.*32x32"):
        load_dataset("tinyimagenet", root=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_and_interleaved():
    ds = load_dataset("synthetic")
    assert ds.x_train.shape == (60, 1, 8, 8) and ds.x_test.shape == (30, 1, 8, 8)
    assert ds.y_train[:6].tolist() == [0, 1, 2, 0, 1, 2]  # not class blocks
    fresh = data._synthetic_raw.__wrapped__(3, 20, 10, 8, 1, 0)  # bypass the cache
    assert np.allclose(ds.denormalize(ds.x_train).numpy(), fresh.x_train, atol=1e-6)
    other = load_dataset("synthetic", options={"seed": 1})
    assert not torch.equal(other.x_train, ds.x_train)

    opts = {"num_classes": 4, "per_class": 6, "test_per_class": 2, "image_size": 16,
            "channels": 3}
    info = get_info("synthetic", options=opts)
    ds = load_dataset("synthetic", options=opts)
    assert ds.x_train.shape == (24, 3, 16, 16) and ds.info == info
    assert info.train_size == 24 and info.test_size == 8 and info.min_class_size == 6
    assert get_info("synthetic", options=opts, train_per_class=2).train_size == 8


def test_synthetic_difficulty_grows_with_rank():
    ds = load_dataset("synthetic", options={"per_class": 40})
    x, y = ds.denormalize(ds.x_train), ds.y_train
    dists = []
    for c in range(3):
        xc = x[y == c]
        dists.append((xc - xc.mean(0)).flatten(1).norm(dim=1))
    dist = torch.stack(dists).mean(0)
    assert dist[:10].mean() < dist[-10:].mean()


# ---------------------------------------------------------------------------------------------
# status


def test_dataset_status(monkeypatch, tmp_path):
    assert dataset_status("digits")[0] and dataset_status("synthetic")[0]
    if os.path.isdir(FMNIST_DIR):
        assert dataset_status("fashion_mnist") == (True, FMNIST_DIR)
    monkeypatch.setenv("HOME", str(tmp_path))  # the default root lives under ~/.cache
    ok, why = dataset_status("cifar10")
    assert not ok and f"{tmp_path}/.cache/selmatch/cifar10" in why
    assert "data.download" in why
