"""The synthetic set: frozen D_select rows, learnable D_distill rows, labels and a learnable lr.

One file format for every method (docs/design.md §1): ``<run_dir>/synset/<method>.pt`` is a
``torch.save`` dict with ``images`` (float, model input space), ``labels`` (long),
``is_distilled`` (bool), ``source_index`` (long, −1 for none), ``syn_lr`` (float), plus ``meta``.
A PNG grid beside it shows, per class (one column each), the D_select rows above the D_distill rows.

Only ``distilled`` is a leaf that optimisers update; ``selected`` is a plain tensor that nothing
can change, so D_select stays bit-identical by construction, not by care.
"""

from __future__ import annotations

import io as _io
import math

import torch

from distill import integrity, storage
from distill.selection import Selection


class SyntheticSet:
    def __init__(self, selected: torch.Tensor, distilled: torch.Tensor, labels: torch.Tensor,
                 is_distilled: torch.Tensor, source_index: torch.Tensor, syn_lr: float):
        if int(is_distilled.sum()) != len(distilled) or int((~is_distilled).sum()) != len(selected):
            raise ValueError("is_distilled does not match the selected/distilled row counts")
        self.selected = selected.detach().clone()
        self.distilled = distilled.detach().clone().requires_grad_(True)
        self.labels = labels.long().clone()
        self.is_distilled = is_distilled.bool().clone()
        self.source_index = source_index.long().clone()
        self.syn_lr = torch.tensor(float(syn_lr), dtype=selected.dtype,
                                   device=selected.device).requires_grad_(True)
        # full[i] = cat([selected, distilled])[perm[i]]: keeps the class-major row order
        order = torch.cat([torch.nonzero(~self.is_distilled).flatten(),
                           torch.nonzero(self.is_distilled).flatten()])
        self._perm = torch.empty_like(order)
        self._perm[order] = torch.arange(len(order))

    @classmethod
    def from_selection(cls, sel: Selection, x_train: torch.Tensor, syn_lr: float) -> SyntheticSet:
        images = x_train[sel.source_index]
        return cls(images[~sel.is_distilled], images[sel.is_distilled], sel.labels,
                   sel.is_distilled, sel.source_index, syn_lr)

    def __len__(self) -> int:
        return len(self.labels)

    def images(self) -> torch.Tensor:
        """All rows in class-major order; differentiable w.r.t. ``distilled``."""
        return torch.cat([self.selected, self.distilled])[self._perm.to(self.selected.device)]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SyntheticSet:
        return SyntheticSet(self.selected.to(device, dtype), self.distilled.detach().to(device, dtype),
                            self.labels.to(device), self.is_distilled, self.source_index,
                            float(self.syn_lr.detach()))

    # -- persistence -------------------------------------------------------------------------

    def state(self, method: str, meta: dict | None = None) -> dict:
        return {
            "images": self.images().detach().cpu(),
            "labels": self.labels.cpu(),
            "is_distilled": self.is_distilled.cpu(),
            "source_index": self.source_index.cpu(),
            "syn_lr": float(self.syn_lr.detach()),
            "method": method,
            "meta": dict(meta or {}),
        }

    @classmethod
    def from_state(cls, state: dict) -> SyntheticSet:
        images, mask = state["images"], state["is_distilled"].bool()
        return cls(images[~mask], images[mask], state["labels"], mask, state["source_index"],
                   state["syn_lr"])

    def save(self, run_dir: str, method: str, *, meta: dict | None = None,
             dataset=None) -> str:
        """Write ``synset/<method>.pt`` and ``synset/<method>.png`` (atomically). With
        ``dataset`` (the data it was made from) the set's ``meta["data"]`` records its name,
        class names and normalisation, so the file can be read back in pixel space anywhere,
        and the grid shows pixels under its class names."""
        meta = dict(meta or {})
        if dataset is not None:
            meta["data"] = {"name": dataset.name, "class_names": list(dataset.class_names),
                            "mean": list(dataset.info.mean), "std": list(dataset.info.std)}
        url = storage.join(run_dir, "synset", f"{method}.pt")
        integrity.torch_save(url, self.state(method, meta))
        png = image_grid(self.images().detach().cpu(), self.labels.cpu(), self.is_distilled.cpu(),
                         denormalize=None if dataset is None else dataset.denormalize,
                         class_names=None if dataset is None else dataset.class_names)
        storage.write_bytes(storage.join(run_dir, "synset", f"{method}.png"), png)
        return url


_KEYS = ("images", "labels", "is_distilled", "source_index", "syn_lr")
FIX = "re-create it with `selmatch run` (or `selmatch distill` for a distilled set)"


def read_synset_state(url: str) -> dict:
    """The verified ``torch.save`` dict of a synset file (DamagedArtifactError naming the file
    when its bytes changed, it does not parse, or a key is missing)."""
    return integrity.torch_load(url, fix=FIX, keys=_KEYS)


def load_synset(run_dir: str, method: str, *,
                image_shape: tuple[int, ...] | None = None,
                num_classes: int | None = None) -> tuple[SyntheticSet, dict]:
    """``synset/<method>.pt``, verified; with ``image_shape`` / ``num_classes`` (the dataset's)
    also checked to belong to that data."""
    url = storage.join(run_dir, "synset", f"{method}.pt")
    if not storage.exists(url):
        raise FileNotFoundError(f"no synthetic set {url}; create it with `selmatch distill` "
                                f"(or `selmatch run`)")
    state = read_synset_state(url)
    images, labels = state["images"], state["labels"]
    shapes = {k: tuple(getattr(state[k], "shape", ())) for k in _KEYS[:4]}
    n = shapes["images"][0] if shapes["images"] else None
    bad = None
    if len(shapes["images"]) != 4 or any(shapes[k] != (n,) for k in _KEYS[1:4]):
        bad = (f"inconsistent shapes {', '.join(f'{k} {list(v)}' for k, v in shapes.items())} "
               f"(images [N, C, H, W], the others [N])")
    elif image_shape is not None and tuple(images.shape[1:]) != tuple(image_shape):
        bad = (f"images of shape {list(images.shape[1:])}, but the dataset's are "
               f"{list(image_shape)}: made for other data")
    elif num_classes is not None and len(labels) and not 0 <= int(labels.min()) <= \
            int(labels.max()) < num_classes:
        bad = f"labels {int(labels.min())}..{int(labels.max())} outside 0..{num_classes - 1}"
    if bad is not None:
        raise integrity.DamagedArtifactError(url, bad, FIX)
    try:
        return SyntheticSet.from_state(state), state
    except (ValueError, IndexError, RuntimeError, TypeError, AttributeError) as err:
        raise integrity.DamagedArtifactError(url, f"inconsistent synthetic set "
                                                  f"({type(err).__name__}: {err})", FIX) from err


def _headed(pil, names: list[str], column: int):
    """``pil`` under a white band with each column's name (cut to fit its width)."""
    from PIL import Image, ImageDraw

    band = 12
    out = Image.new("RGB", (pil.width, pil.height + band), "white")
    out.paste(pil, (0, band))
    draw = ImageDraw.Draw(out)
    fits = max(1, column // 6)  # the default bitmap font is about 6 px per character
    for j, name in enumerate(names):
        draw.text((j * column + 2, 0), name[:fits], fill="black")
    return out


def image_grid(images: torch.Tensor, labels: torch.Tensor, is_distilled: torch.Tensor, *,
               denormalize=None, max_classes: int = 20, max_rows: int = 10, pad: int = 1,
               class_names: tuple[str, ...] | None = None) -> bytes:
    """PNG bytes: one column per class (first ``max_classes``), headed by its name when
    ``class_names`` are given; D_select rows on top (up to ``max_rows``), a gap, then D_distill
    rows (up to ``max_rows``)."""
    from PIL import Image

    x = denormalize(images) if denormalize is not None else images
    x = x.float().clamp(0, 1)
    c, h, w = x.shape[1:]
    classes = sorted(set(labels.tolist()))[:max_classes]
    cols = []
    for cls in classes:
        sel = x[(labels == cls) & ~is_distilled][:max_rows]
        dis = x[(labels == cls) & is_distilled][:max_rows]
        cols.append((sel, dis))
    n_sel = max((len(s) for s, _ in cols), default=0)
    n_dis = max((len(d) for _, d in cols), default=0)
    gap = 1 if n_sel and n_dis else 0
    rows = n_sel + n_dis + gap
    canvas = torch.ones(c, rows * (h + pad) + pad, len(cols) * (w + pad) + pad)
    for j, (sel, dis) in enumerate(cols):
        for i, img in enumerate(list(sel) + [None] * (n_sel - len(sel)) + [None] * gap + list(dis)):
            if img is None:
                continue
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, top:top + h, left:left + w] = img
    scale = max(1, math.ceil(64 / max(h, w)))  # 8x8 digits become readable
    arr = (canvas * 255).round().byte().permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0] if c == 1 else arr)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    if class_names:
        pil = _headed(pil.convert("RGB"), [str(class_names[c]) if c < len(class_names) else
                                           str(c) for c in classes], (w + pad) * scale)
    buf = _io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
