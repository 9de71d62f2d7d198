"""Every artifact a later stage trusts carries its content hash, checked on every read.

    integrity.torch_save(url, state)                 # url + url.sha256
    integrity.torch_load(url, fix="re-create it with `selmatch run`", keys=("images",))
    integrity.problem(url)                           # None, or what is wrong (for owners)

Checkpoints, synthetic sets, scores, window and evaluation results, the experts' manifest, the
tune trials and ``tune/selected.yaml`` are written with a sidecar ``<file>.sha256`` in
``sha256sum`` format (``cd synset && sha256sum -c selmatch.pt.sha256`` checks one by hand). A
reader recomputes the sha256 of the bytes it read and compares: a mismatch, a missing or damaged
sidecar, a sidecar naming another file, or bytes that do not parse is a
:class:`DamagedArtifactError` naming the file, the problem and what to do; the stage that owns the
artifact recomputes it when it is run again (``selmatch run`` logs a warning and redoes it).

Why a sidecar and not a hash inside the file: ``torch.load`` checks no CRC, so a flipped bit in a
tensor loads silently; a hash of the whole file catches any change, needs no parsing first, and
leaves the file formats as they were (a synthetic set is still a ``torch.save`` dict). The
sidecar names its file, so a file copied over another one together with its sidecar (an initial
set over the final one) is caught too.

**Write order.** Replacing an artifact leaves, after a crash or a full disk at any point, the old
pair or the new pair readable, never a mismatch that would throw good progress away (a
checkpoint refused on ``--resume``). Two files cannot be replaced in one atomic step, so the
sidecar may list two accepted hashes while the file is being replaced:

1. the sidecar is rewritten to accept the new hash *and* the old one (atomically: a failure
   leaves the old sidecar);
2. the file is replaced (atomically: a failure leaves the old file, which the sidecar accepts);
3. the sidecar is rewritten to accept the new hash only (a failure leaves both accepted, and the
   file is the new one).

A sidecar accepting two hashes only ever accepts bytes this code wrote. ``sha256sum -c`` reports
the line of the replaced version as failed while a write is in flight or was interrupted.

**Loading runs no code.** ``torch.load`` of a pickle can execute anything its author wrote, and a
checksum does not help (anyone can recompute one). Every artifact the product writes holds only
tensors and plain data, so every load uses ``weights_only=True``; a file that needs more is
refused with its path (:class:`UnsafeArtifactError`). Checksums catch accidents, the restricted
loader catches intent.

There are no unverified exceptions: a file without its sidecar (an experts manifest written by an
older version included) is damaged; ``selmatch experts`` moves such a manifest aside and trains
the experts again.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import pickle
import re
from typing import Any

import torch

from distill import storage

SUFFIX = ".sha256"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class DamagedArtifactError(ValueError):
    """An artifact whose bytes are not what was written (or cannot be read as what it holds)."""

    def __init__(self, url: str, problem: str, fix: str):
        self.url, self.problem, self.fix = url, problem, fix
        super().__init__(f"{url} is damaged ({problem}); {fix}")


class UnsafeArtifactError(DamagedArtifactError):
    """A torch file holding Python objects beyond tensors and plain data: loading it could run
    code, so it is refused without being loaded."""

    def __init__(self, url: str, problem: str, fix: str):
        self.url, self.problem, self.fix = url, problem, fix
        ValueError.__init__(self, f"{url} is refused: {problem}; {fix}")


def sidecar(url: str) -> str:
    return url + SUFFIX


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _sidecar_text(url: str, hashes: list[str]) -> str:
    return "".join(f"{h}  {_name(url)}\n" for h in dict.fromkeys(hashes))


def recorded_hashes(url: str, *, fix: str = "") -> list[str] | None:
    """The hashes ``url``'s sidecar accepts (None: no sidecar). A sidecar that is empty, not
    UTF-8, not ``sha256sum`` lines, or names another file raises DamagedArtifactError naming
    the sidecar and the file."""
    side = sidecar(url)
    if not storage.exists(side):
        return None
    fix = fix or f"delete {side} and {url}, then run the command that makes it"
    raw = storage.read_bytes(side)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedArtifactError(url, f"its checksum file {side} is not UTF-8 text", fix)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DamagedArtifactError(url, f"its checksum file {side} is empty", fix)
    hashes = []
    for line in lines:
        m = _LINE.match(line.strip())
        if m is None:
            raise DamagedArtifactError(
                url, f"its checksum file {side} holds {line[:80]!r}, not a line "
                     f"'<64 hex digits>  {_name(url)}' (truncated or edited)", fix)
        if m.group(2) != _name(url):
            raise DamagedArtifactError(
                url, f"its checksum file {side} is the checksum of {m.group(2)!r}, not of "
                     f"{_name(url)!r}: a file and its sidecar copied over another artifact", fix)
        hashes.append(m.group(1))
    return hashes


def write_bytes(url: str, data: bytes) -> str:
    """Replace ``url`` and its sidecar in the order of the module docstring; returns the sha256."""
    sha = _digest(data)
    try:
        old = recorded_hashes(url) if storage.exists(url) else None
    except DamagedArtifactError:
        old = None  # nothing worth keeping readable
    if old:
        storage.write_text(sidecar(url), _sidecar_text(url, [sha, *old]))
    else:
        storage.write_text(sidecar(url), _sidecar_text(url, [sha]))
    storage.write_bytes(url, data)
    if old:
        storage.write_text(sidecar(url), _sidecar_text(url, [sha]))
    return sha


def recorded(url: str) -> str | None:
    """The newest sha256 the sidecar records (None: no sidecar)."""
    hashes = recorded_hashes(url)
    return None if hashes is None else hashes[0]


def _check(url: str, data: bytes, fix: str = "") -> str | None:
    want = recorded_hashes(url, fix=fix)
    if want is None:
        return f"no {SUFFIX} checksum beside it: written by an interrupted or an older command"
    have = _digest(data)
    if have not in want:
        return (f"its sha256 is {have[:16]}…, the checksum file {_name(sidecar(url))} records "
                f"{want[0][:16]}…: changed on storage since it was written")
    return None


def problem(url: str) -> str | None:
    """What is wrong with ``url`` (None: present and intact); 'missing' when it does not exist."""
    if not storage.exists(url):
        return "missing"
    try:
        return _check(url, storage.read_bytes(url))
    except DamagedArtifactError as err:
        return err.problem


def read_bytes(url: str, *, fix: str) -> bytes:
    """The verified bytes; FileNotFoundError when missing, DamagedArtifactError when damaged."""
    data = storage.read_bytes(url)
    bad = _check(url, data, fix)
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


def torch_from_bytes(url: str, data: bytes, *, fix: str) -> Any:
    """``torch.load`` of ``data`` (the bytes of ``url``) with ``weights_only=True``: tensors and
    plain data only, nothing that can run code. A file needing more is an
    :class:`UnsafeArtifactError`, one torch cannot parse a :class:`DamagedArtifactError`."""
    try:
        return torch.load(_io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" not in text:
            raise DamagedArtifactError(url, f"cannot be read as a torch file: {text[:300]}",
                                       fix) from err
        # torch's message: "... Trying to load unsupported GLOBAL posix.system whose module
        # posix is blocked." (2.14) or "Unsupported global: GLOBAL posix.system ..." (earlier)
        found = re.search(r"(unsupported GLOBAL [^\s]+|Unsupported global: [^\n]+|"
                          r"Unsupported operand [^\n]+)", text, flags=re.IGNORECASE)
        what = found.group(1).strip() if found else "an object weights_only does not admit"
        raise UnsafeArtifactError(
            url, f"it holds Python objects beyond tensors and plain data ({what}), and loading "
                 f"it could run code; selmatch never writes such a file, so it was made or "
                 f"altered elsewhere", f"delete it (and {_name(sidecar(url))}) and make it again "
                 f"with selmatch") from err
    except Exception as err:  # torch raises several types for damaged archives
        raise DamagedArtifactError(url, f"cannot be read as a torch file: "
                                        f"{str(err)[:300]}", fix) from err


def torch_load(url: str, *, fix: str, keys: tuple[str, ...] = ()) -> Any:
    """A verified ``torch.save`` dict holding at least ``keys``, loaded without running code."""
    obj = torch_from_bytes(url, read_bytes(url, fix=fix), fix=fix)
    if not isinstance(obj, dict):
        raise DamagedArtifactError(url, f"holds a {type(obj).__name__}, not a dict", fix)
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DamagedArtifactError(url, f"missing key(s) {', '.join(missing)}", fix)
    return obj
