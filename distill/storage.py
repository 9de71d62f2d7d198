"""Artifact I/O through fsspec, so a run directory may be a local path, ``memory://`` or ``s3://``.

Every write is atomic: the bytes go to a temporary sibling name first and are then moved onto the
final name, so a crash never leaves a half-written file under the name a reader looks for.
What is written here is not verified on reading: artifacts that later stages trust go through
distill/integrity.py (checksums, loads that run no code).
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
    if "::" in url:
        return (f"run_dir {url!r} contains '::', which fsspec reads as a chain of URLs (it would "
                f"write into other directories); give a path or a single URL such as "
                f"runs/<name> or s3://bucket/<name>")
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


def local_path(url: str) -> str | None:
    """The filesystem path of a local path or ``file://`` URL; None for any other URL."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def file_problem(field: str, url: str | None) -> str | None:
    """Why config field ``field`` cannot name a file to read (None: it may; a file that does not
    exist yet is the reader's message): a local directory, or a chained URL."""
    if url is None:
        return None
    if "::" in url:
        return (f"{field} {url!r} is a chained fsspec URL ('::'), which selmatch does not read; "
                f"give a path or a single URL")
    path = local_path(url)
    if path is not None and os.path.isdir(os.path.expanduser(path)):
        return f"{field} {url} is a directory; give a .npy or .npz file"
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
