"""One writer per run directory: every command that writes a run directory holds its lock.

    with run_dir_lock(cfg.run_dir, "selmatch distill"):
        ...                                   # a second command on the same run_dir is refused

The lock is a file ``<run_dir>/.selmatch.lock`` holding the holder's host, pid, command and start
time, created exclusively (``O_CREAT | O_EXCL`` on a local or shared POSIX filesystem, so two
processes racing for it cannot both win). A second writer is refused at once with a
:class:`RunDirBusyError` naming the holder. A lock left by a process that died on this host (its
pid is gone) is taken over with a warning; one from another host is never taken over (that host
may still be writing): its message says which file to delete once that process is known to be gone.
The lock is re-entrant within a process (``selmatch run`` holds it while its stages take it too)
and released when the command ends, also on an error.

**Object stores** (``s3://``, ``gs://``) have no exclusive create through fsspec: there the lock is
written and read back, which catches a writer that started earlier but not two started within
the same second. What protects the results there is the check at the end of every distillation
(distill/distiller.py): ``config.yaml`` and the initial set on storage must still be the ones this
run wrote, or the result is not saved. ``memory://`` run directories (tests) belong to one process
and are locked like local ones.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator

from distill import storage

log = logging.getLogger(__name__)

NAME = ".selmatch.lock"
_HELD: dict[str, int] = {}  # lock url -> depth, for this process


class RunDirBusyError(RuntimeError):
    """Another command is writing this run directory."""


def lock_url(run_dir: str) -> str:
    return storage.join(run_dir, NAME)


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _holder(command: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": command,
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(url: str) -> dict | None:
    try:
        data = json.loads(storage.read_text(url))
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}


def _busy(url: str, holder: dict) -> RunDirBusyError:
    who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
           f"(`{holder.get('command', '?')}`, started {holder.get('started', '?')})")
    return RunDirBusyError(
        f"{url.rsplit('/', 1)[0]} is being written by {who}; one command per run directory: wait "
        f"for it to finish or use another run_dir. If that process is gone, delete {url}")


def _create(url: str, payload: str) -> bool:
    """Create the lock file exclusively; False when it exists."""
    path = _local_path(url)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(payload)
        return True
    if storage.exists(url):  # no exclusive create through fsspec: write, then read back
        return False
    storage.write_text(url, payload)
    return storage.read_text(url) == payload


def acquire(run_dir: str, command: str) -> str:
    """Take the lock of ``run_dir`` (re-entrant in this process); returns its URL."""
    url = lock_url(run_dir)
    if url in _HELD:
        _HELD[url] += 1
        return url
    me = _holder(command)
    for _ in range(2):
        if _create(url, json.dumps(me) + "\n"):
            _HELD[url] = 1
            return url
        holder = _read(url)
        if holder is None:  # released meanwhile
            continue
        pid = holder.get("pid")
        if holder.get("host") == me["host"] and isinstance(pid, int) and pid == me["pid"]:
            storage.remove(url)  # our own, from a lock that was not released (a crashed test)
            continue
        if holder.get("host") == me["host"] and isinstance(pid, int) and not _alive(pid):
            log.warning("taking over the lock %s of pid %d (`%s`, started %s), which is no "
                        "longer running", url, pid, holder.get("command"), holder.get("started"))
            storage.remove(url)
            continue
        raise _busy(url, holder)
    raise _busy(url, _read(url) or {})


def release(url: str) -> None:
    if url not in _HELD:
        return
    _HELD[url] -= 1
    if _HELD[url] == 0:
        del _HELD[url]
        holder = _read(url)
        if holder is not None and holder.get("pid") == os.getpid():
            storage.remove(url)


@contextlib.contextmanager
def run_dir_lock(run_dir: str, command: str | None = None) -> Iterator[str]:
    """Hold ``run_dir``'s lock for the block (see the module docstring)."""
    url = acquire(run_dir, command or " ".join(["selmatch", *sys.argv[1:2]]))
    try:
        yield url
    finally:
        release(url)
