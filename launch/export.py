"""``selmatch export``: a row's synthetic set as files any training code reads.

    selmatch export --config configs/quickstart.yaml --row selmatch --out exported/
    selmatch export --config F --row random --repetition 1 --out exported/ --no-test

Writes, for the row's set of one repetition seed (it must be present and fresh):

    OUT/train/<NNN_class>/<i>.png   every image in pixel space, 8-bit (distilled pixels outside
                                    [0, 1] are clamped), one folder per class, numbered so that
                                    sorted folder order is label order
    OUT/val/<NNN_class>/<j>.png     the dataset's test images, so that OUT loads as a dataset
                                    (``--data.name imagefolder --data.root OUT``); not with
                                    --no-test
    OUT/labels.csv                  file, label, class name, distilled (0/1), source index
                                    (-1: none), one line per image
    OUT/metadata.json               the row, its start (window β or random, and where it came
                                    from), α, syn_lr, which images were distilled, the data's
                                    normalisation and class names, the set's stamp
    OUT/tensors.pt                  plain tensors (``torch.load(..., weights_only=True)``):
                                    ``pixels`` float32 [N, C, H, W] unclamped, ``images`` in
                                    model input space, ``labels``, ``is_distilled``,
                                    ``source_index``, ``mean``, ``std``, ``class_names``

The PNGs round-trip: the folder loaded as ``imagefolder`` gives the same images up to 8-bit
rounding, with the same labels (tests/test_api.py).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re

import torch

from distill import storage
from distill.artifacts import set_of
from distill.config import RunConfig
from distill.config_io import load_config
from distill.data import Dataset, load_configured
from distill.freshness import Freshness, MissingStagesError
from distill.methods import METHODS, augment_for
from distill.synset import load_synset

log = logging.getLogger(__name__)


def class_folder(label: int, name: str) -> str:
    """``003_Dress``: the label first, so that sorted folders are in label order."""
    return f"{label:03d}_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class")


def _png(pixels: torch.Tensor) -> bytes:
    from PIL import Image

    arr = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def _folder(out: str, split: str, pixels: torch.Tensor, labels: torch.Tensor,
            names: tuple[str, ...]) -> list[str]:
    files = []
    for i, (img, label) in enumerate(zip(pixels, labels.tolist())):
        path = f"{split}/{class_folder(label, names[label])}/{i:05d}.png"
        storage.write_bytes(storage.join(out, path), _png(img))
        files.append(path)
    return files


def export_set(cfg: RunConfig, row: str, out: str, *, seed: int | None = None,
               test: bool = True, ds: Dataset | None = None) -> dict:
    """Export row ``row``'s set of repetition ``seed`` (default: the run seed) to ``out``;
    returns the metadata written. A missing or stale set is a MissingStagesError."""
    if row not in METHODS:
        raise ValueError(f"--row {row!r} is not a row; valid: {', '.join(METHODS)}")
    seed = cfg.seed if seed is None else seed
    check = Freshness(cfg, ds)
    ref = set_of(row, seed)
    problems = check.problems([ref])
    if problems:
        raise MissingStagesError("export", problems)
    ds = ds if ds is not None else load_configured(cfg.data)
    rep = check.rep(ref)
    synset, state = load_synset(rep.run_dir, METHODS[row].synset, image_shape=ds.image_shape,
                                num_classes=ds.num_classes)
    images = synset.images().detach().float()
    pixels = ds.denormalize(images)
    files = _folder(out, "train", pixels, synset.labels, ds.class_names)
    if test:
        _folder(out, "val", ds.denormalize(ds.x_test), ds.y_test, ds.class_names)
    meta = state.get("meta", {})
    rows = [{"file": f, "label": int(y), "class": ds.class_names[int(y)],
             "distilled": int(d), "source_index": int(s)}
            for f, y, d, s in zip(files, synset.labels, synset.is_distilled,
                                  synset.source_index)]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(storage.join(out, "labels.csv"), text.getvalue())
    clamped = int(((pixels < 0) | (pixels > 1)).any(dim=(1, 2, 3)).sum())
    metadata = {
        "row": row, "label": METHODS[row].label, "set": METHODS[row].synset, "seed": seed,
        "run_dir": rep.run_dir, "start": meta.get("start"), "alpha": meta.get("alpha"),
        "alpha_source": meta.get("alpha_source"), "syn_lr": float(synset.syn_lr.detach()),
        "iterations": meta.get("iterations"), "eval_augment": augment_for(row, cfg),
        "images": len(files), "distilled": int(synset.is_distilled.sum()),
        "is_distilled": synset.is_distilled.tolist(),
        "source_index": synset.source_index.tolist(),
        "images_clamped_in_png": clamped, "data": {
            "name": ds.name, "class_names": list(ds.class_names), "mean": list(ds.info.mean),
            "std": list(ds.info.std), "image_shape": list(ds.image_shape)},
        "stamp": meta.get("stamp"), "test_split": "val/" if test else None}
    storage.write_text(storage.join(out, "metadata.json"), json.dumps(metadata, indent=1) + "\n")
    buf = io.BytesIO()
    torch.save({"pixels": pixels, "images": images, "labels": synset.labels,
                "is_distilled": synset.is_distilled, "source_index": synset.source_index,
                "mean": torch.tensor(ds.info.mean), "std": torch.tensor(ds.info.std),
                "class_names": list(ds.class_names)}, buf)
    storage.write_bytes(storage.join(out, "tensors.pt"), buf.getvalue())
    log.info("exported %s (%d images, %d distilled) of seed %d to %s", row, len(files),
             metadata["distilled"], seed, out)
    return metadata


def cmd_export(args, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides)
    export_set(cfg, args.row, args.out, seed=args.repetition, test=not args.no_test)
    print(args.out)
    return 0

