"""Every artifact a later stage trusts carries its content hash, checked on every read.

    integrity.torch_save(url, state)                 # url + url.sha256
    integrity.torch_load(url, fix="re-create it with `selmatch run`", keys=("images",))
    integrity.problem(url)                           # None, or what is wrong (for owners)

Checkpoints, synthetic sets, scores, window and evaluation results, the experts' manifest, the
tune trials and ``tune/selected.yaml`` are written with a sidecar ``<file>.sha256`` in
``sha256sum`` format (``cd synset && sha256sum -c selmatch.pt.sha256`` checks one by hand). A
reader recomputes the sha256 of the bytes it read and compares: a mismatch, a missing sidecar, or
bytes that do not parse is a :class:`DamagedArtifactError` naming the file, the problem and what to
do; the stage that owns the artifact recomputes it when it is run again (``selmatch run`` logs a
warning and redoes it).

Why a sidecar and not a hash inside the file: ``torch.load`` checks no CRC, so a flipped bit in a
tensor loads silently; a hash of the whole file catches any change, needs no parsing first, and
leaves the file formats as they were (a synthetic set is still a ``torch.save`` dict). The sidecar
is written *before* the file: a crash between the two leaves a new hash beside old (or no) bytes,
which reads as damaged, never as complete. One exception keeps older run directories usable: an
experts manifest written before sidecars existed is accepted unverified (its expert files are still
checked against the sha256 it records) and gains a sidecar at its next write.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
from typing import Any

import torch

from distill import storage

SUFFIX = ".sha256"


class DamagedArtifactError(ValueError):
    """An artifact whose bytes are not what was written (or cannot be read as what it holds)."""

    def __init__(self, url: str, problem: str, fix: str):
        self.url, self.problem, self.fix = url, problem, fix
        super().__init__(f"{url} is damaged ({problem}); {fix}")


def sidecar(url: str) -> str:
    return url + SUFFIX


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes(url: str, data: bytes) -> str:
    """The sidecar, then the file (both atomically); returns the sha256."""
    sha = _digest(data)
    storage.write_text(sidecar(url), f"{sha}  {url.rsplit('/', 1)[-1]}\n")
    storage.write_bytes(url, data)
    return sha


def recorded(url: str) -> str | None:
    """The sha256 the sidecar records (None: no sidecar)."""
    if not storage.exists(sidecar(url)):
        return None
    text = storage.read_text(sidecar(url)).split()
    return text[0] if text else ""


def _check(url: str, data: bytes) -> str | None:
    want = recorded(url)
    if want is None:
        return f"no {SUFFIX} checksum beside it: written by an interrupted or an older command"
    if _digest(data) != want:
        return (f"sha256 {_digest(data)[:12]}… differs from the {want[:12]}… recorded when it was "
                f"written: changed on storage since")
    return None


def problem(url: str) -> str | None:
    """What is wrong with ``url`` (None: present and intact); 'missing' when it does not exist."""
    if not storage.exists(url):
        return "missing"
    return _check(url, storage.read_bytes(url))


def read_bytes(url: str, *, fix: str) -> bytes:
    """The verified bytes; FileNotFoundError when missing, DamagedArtifactError when damaged."""
    data = storage.read_bytes(url)
    bad = _check(url, data)
    if bad is not None:
        raise DamagedArtifactError(url, bad, fix)
    return data


def remove(url: str) -> None:
    storage.remove(url)
    storage.remove(sidecar(url))


# -- typed helpers ---------------------------------------------------------------------------


def write_text(url: str, text: str) -> str:
    return write_bytes(url, text.encode("utf-8"))


def read_text(url: str, *, fix: str) -> str:
    data = read_bytes(url, fix=fix)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DamagedArtifactError(url, f"not UTF-8 text: {err}", fix) from err


def write_json(url: str, obj: Any) -> str:
    return write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def parse_json(url: str, text: str, *, fix: str, kind: type = dict) -> Any:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedArtifactError(url, f"not valid JSON: {err}", fix) from err
    if not isinstance(obj, kind):
        raise DamagedArtifactError(url, f"holds a JSON {type(obj).__name__}, not a "
                                        f"{kind.__name__}", fix)
    return obj


def read_json(url: str, *, fix: str, kind: type = dict) -> Any:
    return parse_json(url, read_text(url, fix=fix), fix=fix, kind=kind)


def torch_save(url: str, obj: Any) -> str:
    buf = _io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(url, buf.getvalue())


def torch_load(url: str, *, fix: str, keys: tuple[str, ...] = ()) -> Any:
    """A verified ``torch.save`` dict holding at least ``keys``."""
    data = read_bytes(url, fix=fix)
    try:
        obj = torch.load(_io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for damaged archives
        raise DamagedArtifactError(url, f"cannot be read as a torch file: {err}", fix) from err
    if not isinstance(obj, dict):
        raise DamagedArtifactError(url, f"holds a {type(obj).__name__}, not a dict", fix)
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DamagedArtifactError(url, f"missing key(s) {', '.join(missing)}", fix)
    return obj
