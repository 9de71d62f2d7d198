"""``data.name: imagefolder``: folders of PNG/JPEG files written here, good and malformed."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from distill import storage
from distill.config import ConfigError
from distill.config_io import from_dict
from distill.data import DatasetNotFoundError, get_info, load_dataset
from distill.imagefolder import MalformedFolderError


def write_png(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_tree(root, classes=("zebra", "ant", "cat"), per_class=4, size=6, val=True, seed=0):
    """root/train/<class>/<i>.png (+ root/val/<class>/v<i>.png); returns {path: pixels}."""
    rng = np.random.RandomState(seed)
    written = {}
    for split, n in (("train", per_class),) + ((("val", 2),) if val else ()):
        for c in classes:
            for i in range(n):
                px = rng.randint(0, 256, (size, size, 3), dtype=np.uint8)
                path = root / split / c / f"{'v' if split == 'val' else ''}{i}.png"
                write_png(path, px)
                written[str(path)] = px
    return written


def test_folder_with_val_split_loads_in_sorted_order(tmp_path):
    written = make_tree(tmp_path)
    ds = load_dataset("imagefolder", root=str(tmp_path))
    assert ds.class_names == ("ant", "cat", "zebra")  # sorted, not creation order
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.y_test.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.image_shape == (3, 6, 6) and ds.info.num_classes == 3
    # pixels round-trip exactly, in sorted file order within a class
    expected = np.stack([written[str(tmp_path / "train" / c / f"{i}.png")]
                         for c in ds.class_names for i in range(4)]).transpose(0, 3, 1, 2)
    back = np.rint(ds.denormalize(ds.x_train).double().numpy() * 255)
    assert np.array_equal(back, expected)
    # normalisation computed on the train split: per channel mean and population std
    pix = expected.astype(np.float64) / 255
    assert np.allclose(ds.info.mean, pix.mean(axis=(0, 2, 3)), atol=1e-12)
    assert np.allclose(ds.info.std, pix.std(axis=(0, 2, 3)), atol=1e-12)
    assert torch.allclose(ds.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_split_fraction_without_val_is_stratified_and_seeded(tmp_path):
    make_tree(tmp_path, per_class=8, val=False)
    opts = {"val_fraction": 0.25}
    ds = load_dataset("imagefolder", root=str(tmp_path), options=opts)
    assert np.bincount(ds.y_train.numpy()).tolist() == [6, 6, 6]
    assert np.bincount(ds.y_test.numpy()).tolist() == [2, 2, 2]
    again = load_dataset("imagefolder", root=str(tmp_path), options=opts)
    assert torch.equal(ds.x_test, again.x_test)
    other = load_dataset("imagefolder", root=str(tmp_path), options={**opts, "split_seed": 1})
    assert not torch.equal(ds.x_test, other.x_test)
    info = get_info("imagefolder", root=str(tmp_path), options=opts, train_per_class=5)
    assert (info.train_size, info.min_class_size) == (15, 5)


def test_resize_greyscale_and_given_normalisation(tmp_path):
    rng = np.random.RandomState(1)
    for i, size in enumerate((6, 9, 12)):  # mixed sizes
        write_png(tmp_path / "train" / "a" / f"{i}.png", rng.randint(0, 256, (size, size, 3),
                                                                    dtype=np.uint8))
        write_png(tmp_path / "train" / "b" / f"{i}.png", rng.randint(0, 256, (size, 2 * size, 3),
                                                                    dtype=np.uint8))
    opts = {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.25], "val_fraction": 0.34}
    ds = load_dataset("imagefolder", root=str(tmp_path), options=opts)
    assert ds.image_shape == (1, 8, 8) and ds.info.mean == (0.5,) and ds.info.std == (0.25,)
    assert len(ds.y_train) == 4 and len(ds.y_test) == 2
    assert float(ds.denormalize(ds.x_train).min()) >= 0 and float(ds.denormalize(ds.x_train).max()) <= 1


def test_fsspec_root(tmp_path):
    root = f"memory://imagefolder-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    local = make_tree(tmp_path)
    for path in local:
        rel = path[len(str(tmp_path)):]
        with open(path, "rb") as f:
            fs.pipe(root.removeprefix("memory://") + rel, f.read())
    ds = load_dataset("imagefolder", root=root)
    assert ds.class_names == ("ant", "cat", "zebra") and len(ds.y_train) == 12


@pytest.mark.parametrize("case", ["empty class", "mixed sizes", "unreadable", "not square",
                                  "unknown val class", "no train"])
def test_malformed_tree_names_the_path(tmp_path, case):
    make_tree(tmp_path, val=False)
    error, where = MalformedFolderError, None
    if case == "empty class":
        (tmp_path / "train" / "dog").mkdir()
        (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
        where = str(tmp_path / "train" / "dog")
    elif case == "mixed sizes":
        write_png(tmp_path / "train" / "cat" / "big.png", np.zeros((9, 9, 3), np.uint8))
        where = str(tmp_path / "train" / "cat" / "big.png")
    elif case == "unreadable":
        (tmp_path / "train" / "ant" / "broken.png").write_bytes(b"\x89PNG not really")
        where = str(tmp_path / "train" / "ant" / "broken.png")
    elif case == "not square":
        for c in ("ant", "cat", "zebra"):
            for i in range(4):
                write_png(tmp_path / "train" / c / f"{i}.png", np.zeros((6, 5, 3), np.uint8))
        where = str(tmp_path / "train" / "ant" / "0.png")
    elif case == "unknown val class":
        write_png(tmp_path / "val" / "yak" / "0.png", np.zeros((6, 6, 3), np.uint8))
        where = str(tmp_path / "val" / "yak")
    else:
        storage.remove(str(tmp_path / "train"))
        error, where = DatasetNotFoundError, str(tmp_path / "train")
    with pytest.raises(error) as err:
        load_dataset("imagefolder", root=str(tmp_path))
    assert where in str(err.value)
    # the same problem, through a config, names the field too
    with pytest.raises(ConfigError) as cerr:
        from_dict({"data": {"name": "imagefolder", "root": str(tmp_path)}, "select": {"ipc": 1}})
    assert "data.root" in str(cerr.value) and where in str(cerr.value)


def test_bad_options_and_missing_root():
    with pytest.raises(ConfigError) as err:
        from_dict({"data": {"name": "imagefolder", "root": "/nonexistent",
                            "options": {"channels": 2, "val_fraction": 1.5, "mean": [0.5]}}})
    text = str(err.value)
    assert "channels must be 1 or 3, got 2" in text and "val_fraction must be in (0, 1)" in text
    assert "mean and std must be given together" in text
    with pytest.raises(ConfigError, match="data.root: imagefolder: data.root is required"):
        from_dict({"data": {"name": "imagefolder"}})


def test_experts_record_class_order(tmp_path):
    from launch.experts import run_experts

    make_tree(tmp_path / "data", per_class=6, size=8)
    cfg = from_dict({"run_dir": str(tmp_path / "run"),
                     "data": {"name": "imagefolder", "root": str(tmp_path / "data")},
                     "model": {"width": 4, "depth": 1},
                     "experts": {"num_experts": 1, "epochs": 2, "batch_size": 8, "el2n_epoch": 1},
                     "select": {"ipc": 2}, "distill": {"max_start_epoch": 1, "expert_epochs": 1}})
    run_experts(cfg, workers=0, progress=False)
    record = storage.read_json(str(tmp_path / "run" / "data.json"))
    assert record["class_names"] == ["ant", "cat", "zebra"]
    assert record["image_shape"] == [3, 8, 8] and record["train_size"] == 18
