"""docs/api.md is what the Python API does: every ```python block of the page runs, in order, in
one namespace, in a fresh folder (with the repository's configs/), and what the page says a
``print`` shows (its ``# ...`` comment) is what it printed. The export's folder loads back with
the set's labels and its pixels to within 8-bit rounding."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil

import numpy as np
import pytest
import torch

from distill.data import DATASETS
from distill.models import MODELS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(REPO, "docs", "api.md")


def blocks() -> list[str]:
    with open(PAGE) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def promised(block: str) -> list[str]:
    """The comment after each ``print(...)`` line: what the page says it shows."""
    return [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", block, re.M)]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Each block's printed lines, after running them all in order in a fresh folder."""
    folder = tmp_path_factory.mktemp("api")
    shutil.copytree(os.path.join(REPO, "configs"), folder / "configs")
    here = os.getcwd()
    namespace: dict = {"__name__": "__api_doc__"}
    printed = []
    registries = dict(DATASETS), dict(MODELS)  # the page registers a dataset and a network
    os.chdir(folder)
    try:
        for code in blocks():
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, PAGE, "exec"), namespace)
            printed.append(out.getvalue().splitlines())
        assert "three_levels" in DATASETS and "tiny_mlp" in MODELS
        yield folder, namespace, printed
    finally:
        os.chdir(here)
        for registry, before in zip((DATASETS, MODELS), registries):
            registry.clear()
            registry.update(before)


def test_the_page_has_blocks_that_promise_output():
    assert len(blocks()) >= 6 and sum(len(promised(b)) for b in blocks()) >= 5


def test_every_block_runs_and_prints_what_the_page_says(ran):
    _, _, printed = ran
    for code, lines in zip(blocks(), printed):
        prints = [line for line in code.splitlines() if line.startswith("print(")]
        assert len(lines) == len(prints), (code, lines)  # one line per print
        for line, said in zip(lines, [m for m in (_said(p) for p in prints)]):
            if said is not None:
                assert _matches(line, said), f"printed {line!r}, the page says {said!r}"


def _said(print_line: str) -> str | None:
    m = re.match(r"^print\(.*\)\s+#\s*(.+)$", print_line)
    return m.group(1).strip() if m else None


def _matches(line: str, said: str) -> bool:
    """The page's comment lists what the line shows: each comma-separated part appears in it
    (numbers as whole numbers, words as words)."""
    words = [w.strip() for w in re.split(r",\s*", said) if w.strip()]
    return all(re.search(rf"(?<![\w.]){re.escape(_core(w))}(?![\w.])", line) for w in words)


def _core(part: str) -> str:
    """'40 images' -> '40' (the figure; the rest names it)."""
    m = re.match(r"^(\d+) images$", part)
    return m.group(1) if m else part


def test_the_export_loads_back_as_the_set(ran):
    folder, ns, _ = ran
    s, folder_ds = ns["s"], ns["folder"]
    assert folder_ds.x_train.shape[0] == len(s.labels)
    # class folders sort as the set's classes: the same labels, image for image (file order)
    order = _export_order(folder / "runs" / "api_export")
    assert torch.equal(folder_ds.y_train, s.labels[order])
    pixels = folder_ds.denormalize(folder_ds.x_train)
    expected = s.pixels[order].clamp(0, 1)
    assert float((pixels - expected).abs().max()) <= 0.5 / 255 + 1e-5  # 8-bit rounding
    tensors = torch.load(folder / "runs" / "api_export" / "tensors.pt", weights_only=True)
    assert torch.equal(tensors["images"], s.images) and torch.equal(tensors["labels"], s.labels)


def _export_order(out) -> torch.Tensor:
    """The set's row of each file of train/, in the order the folder loader reads them (the
    export names each PNG by its row: train/<NNN_class>/<row>.png)."""
    files = sorted(os.path.relpath(os.path.join(d, n), out)
                   for d, _, names in os.walk(out / "train") for n in names)
    return torch.tensor([int(os.path.splitext(os.path.basename(f))[0]) for f in files])


def test_the_set_grid_is_headed_by_class_names():
    """The PNG beside each set has one column per class, under a band that names it."""
    from PIL import Image

    from distill.synset import image_grid

    images = torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    distilled = torch.tensor([False, True] * 3)
    plain = Image.open(io.BytesIO(image_grid(images, labels, distilled)))
    named = Image.open(io.BytesIO(image_grid(images, labels, distilled,
                                             class_names=("cat", "dog", "eel"))))
    assert named.width == plain.width and named.height == plain.height + 12
    band = np.asarray(named.convert("L"))[:12]
    assert int((band < 128).sum()) > 0  # text drawn in the band


def test_selmatch_export_on_the_command_line(ran, tmp_path, capsys):
    """The command writes what the API does, and a row that is not one is refused (exit 2)."""
    import dataclasses
    import json

    from distill.config_io import dump_yaml
    from launch.cli import main

    folder, ns, _ = ran
    cfg = dataclasses.replace(ns["cfg"], run_dir=str(folder / "runs" / "api"))
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    out = tmp_path / "out"
    assert main(["export", "--config", str(path), "--row", "random", "--out", str(out),
                 "--no-test"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["row"] == "random" and meta["distilled"] == 0 and meta["test_split"] is None
    assert not (out / "val").exists() and len(list((out / "train").rglob("*.png"))) == 100
    assert main(["export", "--config", str(path), "--row", "nope", "--out", str(out)]) == 2
    assert "--row 'nope' is not a row" in capsys.readouterr().err
