"""Artifact I/O through fsspec, so a run directory may be a local path, ``memory://`` or ``s3://``.

Every write is atomic: the bytes go to a temporary sibling name first and are then moved onto the
final name, so a crash never leaves a half-written file under the name a reader looks for.
Readers that need more than "the file exists" (experts, checkpoints) also record sizes and
checksums in their manifests.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import uuid
from typing import Any

import fsspec
import torch


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL/path components with '/' (fsspec's separator everywhere, also on local paths)."""
    out = str(base).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


class RunDirError(ValueError):
    """run_dir cannot hold artifacts: a file, or not writable."""


def run_dir_problem(url: str) -> str | None:
    """Why ``url`` cannot be a run directory without reading anything (None: it can): empty, or
    the root of its filesystem (a run would write config.yaml, experts/, ... straight into /)."""
    if not isinstance(url, str) or not url.strip():
        return ("run_dir must name a directory (a path or fsspec URL such as runs/quickstart), "
                f"got {url!r}")
    if "://" in url and not url.startswith("file://"):
        path = url.split("://", 1)[1]
    else:
        path = os.path.realpath(os.path.expanduser(url[len("file://"):] if
                                                   url.startswith("file://") else url))
    if path.strip("/") == "" or os.path.dirname(path) == path:
        example = (url.split("://", 1)[0] + "://" if "://" in url else "/") + "runs/<name>"
        return (f"run_dir {url!r} is the root of its filesystem; give it a directory of its own "
                f"(e.g. {example})")
    return None


def check_writable(url: str) -> None:
    """Raise RunDirError unless ``url`` is (or can become) a directory this process can write.

    Called before a stage writes anything, so a bad ``run_dir`` is one clear message instead of
    a traceback halfway through a run (and nothing is half-written)."""
    fs, path = _fs(url)
    if fs.exists(path) and not fs.isdir(path):
        raise RunDirError(f"run_dir {url} is a file, not a directory; point run_dir at a "
                          f"directory (it is created if missing)")
    probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
    except (PermissionError, OSError) as err:
        raise RunDirError(f"run_dir {url} is not writable ({type(err).__name__}: "
                          f"{getattr(err, 'strerror', None) or err}); choose another run_dir or "
                          f"fix its permissions") from err


def remove(url: str) -> None:
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def size(url: str) -> int:
    fs, path = _fs(url)
    return int(fs.size(path))


def read_bytes(url: str) -> bytes:
    fs, path = _fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    """Atomic write: temporary sibling, then move onto ``url``."""
    fs, path = _fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        if fs.exists(path) and not _is_local(fs):
            fs.rm(path)
        fs.mv(tmp, path)
    except BaseException as err:
        try:  # a failed write leaves no temporary file behind
            if fs.exists(tmp):
                fs.rm(tmp)
        except OSError:
            pass
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            raise OSError(err.errno, f"cannot write {url} ({err.strerror or err}); free space "
                                     f"or fix the permissions, then run the command again") from err
        raise


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    # A local rename replaces the target atomically; other filesystems need the old one removed.
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def sha256(url: str) -> str:
    return hashlib.sha256(read_bytes(url)).hexdigest()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save(url: str, obj: Any) -> str:
    """Atomically ``torch.save`` ``obj``; returns the sha256 of the bytes written."""
    buf = _io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    write_bytes(url, data)
    return hashlib.sha256(data).hexdigest()


def torch_load(url: str, *, expected_sha256: str | None = None, expected_size: int | None = None) -> Any:
    """Load a ``torch.save`` file; with expectations, a truncated or altered file raises ValueError."""
    data = read_bytes(url)
    if expected_size is not None and len(data) != expected_size:
        raise ValueError(f"{url}: size {len(data)} bytes, expected {expected_size} "
                         f"(truncated or overwritten; delete it and re-create it)")
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(f"{url}: checksum mismatch (corrupt file; delete it and re-create it)")
    try:
        return torch.load(_io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for damaged archives
        raise ValueError(f"{url}: cannot be read as a torch file ({err})") from err
