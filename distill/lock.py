"""One writer per run directory: every command that writes a run directory holds its lock.

    with run_dir_lock(cfg.run_dir, "selmatch distill"):
        ...                                   # a second command on the same run_dir is refused

The lock is the file ``<run_dir>/.selmatch.lock``. It names its holder: host name, machine id
(``/etc/machine-id``), boot id, pid and the pid's start time, command and start time; the
machine and boot ids tell apart two machines that share a host name, the pid's start time a pid
reused after its process ended. A second writer is refused at once with a
:class:`RunDirBusyError` naming the holder and what to do. The lock is re-entrant within a
process (``selmatch run`` holds it while its stages take it too) and released when the command
ends, also on an error. What it promises depends on where the run directory lives:

**A local disk** (a path or ``file://``): the holder keeps the file open with
``flock(LOCK_EX)``, which the kernel drops when the process ends however it ends (SIGKILL, OOM).
Taking the lock, also taking over a stale one, is atomic: of any number of commands starting
together exactly one wins. A lock file whose flock is free is stale by definition and is taken
over with a warning naming what it held (an empty file too: its writer died, e.g. on a full
disk), except when it names a process of this machine that still runs (a holder that does not
use flock: an older selmatch). Release unlinks the file while holding the flock; whoever locked
the old file meanwhile sees that the path no longer names it and starts again.

**A shared filesystem** (NFS): Linux NFS clients implement flock with POSIX locks held on the
server, so the same holds across machines, with two limits. A machine that crashes (rather than
a process that dies) keeps its lock until the server notices, which can take a long time; delete
the file by hand once you know it is gone. And a mount without network locking (``nolock``,
``local_lock=flock|all``), like any filesystem not known to share locks between machines,
keeps flock inside one machine: there a free lock that names another machine is not taken over
(``selmatch unlock`` removes it), and only the exclusive create of the file keeps two machines
apart. A filesystem that has no flock at all (ENOLCK, EOPNOTSUPP) gets the exclusive create
alone (``O_CREAT | O_EXCL``): a lock left by a process that died is never taken over
automatically there, since a live holder cannot be told from a dead one.

**Object stores** (``s3://``, ``gs://``, any other fsspec filesystem): the lock is created with
fsspec's exclusive mode ``"xb"`` and read back. A backend that implements ``"xb"`` as a
conditional create (recent s3fs on S3 and stores that honour ``If-None-Match``, gcsfs, adlfs)
lets exactly one of two commands starting together create it; one that accepts ``"xb"`` as a
plain write (fsspec's default) only lets the read-back catch a writer that started earlier, not
two that start within the same moment. Nothing on an object store says whether the holder still
runs, so its lock is never taken over: ``selmatch unlock`` removes it on the user's word. What
protects the results there is the check at the end of every distillation
(launch/distillation.py): ``config.yaml`` and the initial set on storage must still be the ones
this run wrote, or the result is not saved.

**memory://** run directories (tests) belong to one process and go through fsspec like object
stores; a lock this process left behind is taken back.

:func:`busy_holder` and :func:`check_not_busy` ask, without taking or creating anything, whether
a command would be refused now; :func:`unlock` (``selmatch unlock``) removes a lock that nothing
else can judge stale.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterator

import fsspec

from distill import storage

log = logging.getLogger(__name__)

NAME = ".selmatch.lock"
_HELD: dict[str, int] = {}  # lock url -> depth, for this process
_FDS: dict[str, tuple[int, int]] = {}  # lock url -> (fd holding it, pid that opened it): local
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_ATTEMPTS = 8  # a lock released (or removed) while we open it is taken again from the start
# Filesystems of one machine: a free flock there proves that nobody holds the lock.
_LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "zfs", "f2fs",
                       "overlay", "bcachefs", "jfs", "reiserfs", "vfat", "exfat", "ntfs3",
                       "hfsplus"})


class RunDirBusyError(RuntimeError):
    """Another command is writing this run directory (or may be: the message says which)."""

    def __init__(self, message: str, *, lock: str | None = None, holder: dict | None = None):
        super().__init__(message)
        self.lock = lock
        self.holder = holder if holder is not None else {}


def lock_url(run_dir: str) -> str:
    return storage.join(run_dir, NAME)


# --------------------------------------------------------------------------------------------
# Who holds it


def _first_line(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.readline().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _machine_ids() -> tuple[str | None, str | None]:
    """(machine id, boot id): the machine, and this boot of it (None where the system has none)."""
    machine = _first_line("/etc/machine-id") or _first_line("/var/lib/dbus/machine-id")
    return machine, _first_line("/proc/sys/kernel/random/boot_id")


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, field 22 of /proc/<pid>/stat); None if
    unknown. A pid reused by a new process has another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name, in (), may hold spaces
        return int(fields[19])  # fields[0] is field 3
    except (OSError, IndexError, ValueError):
        return None


def identity(command: str) -> dict:
    """What the lock file says about this process."""
    machine, boot = _machine_ids()
    return {"host": socket.gethostname(), "machine_id": machine, "boot_id": boot,
            "pid": os.getpid(), "pid_start": _start_time(os.getpid()), "command": command,
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _parse(text: str | None) -> dict | None:
    """The holder a lock file names; None when it names none (empty or damaged)."""
    try:
        data = json.loads(text or "")
    except ValueError:
        return None
    ok = isinstance(data, dict) and isinstance(data.get("pid"), int)
    return data if ok else None


def _judge(holder: dict, me: dict) -> str:
    """``"ours"`` (this very process), ``"running"`` (a live process of this machine), ``"gone"``
    (a process of this machine that has ended), ``"restarted"`` (this machine, an earlier boot)
    or ``"elsewhere"`` (another machine, or one that cannot be told from another)."""
    pid, start = holder["pid"], holder.get("pid_start")
    boot = holder.get("boot_id")
    if boot is None and (me["boot_id"] is None or "boot_id" not in holder):
        # an older selmatch's file, or a system without boot ids: the host name is all there is
        if holder.get("host") != me["host"]:
            return "elsewhere"
        if pid == me["pid"] and start == me["pid_start"]:
            return "ours"
        return "running" if _alive(pid) and pid != me["pid"] else "gone"
    if boot is not None and boot == me["boot_id"]:  # this boot of this machine: its pids are ours
        if (pid, start, holder.get("machine_id")) == (me["pid"], me["pid_start"],
                                                     me["machine_id"]):
            return "ours"
        alive = _alive(pid)
        now = _start_time(pid) if alive else None
        return "running" if alive and (start is None or now is None or now == start) else "gone"
    mid = holder.get("machine_id")
    if mid is not None and mid == me["machine_id"] and boot is not None and me["boot_id"]:
        return "restarted"
    return "elsewhere"


def _who(holder: dict) -> str:
    machine = f", machine {str(holder['machine_id'])[:8]}" if holder.get("machine_id") else ""
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"(`{holder.get('command', '?')}`, started {holder.get('started', '?')}{machine})")


def unlock_command(run_dir: str) -> str:
    """The ``selmatch unlock`` command that clears ``run_dir``'s lock: with this process's own
    ``--config`` when it was started with one, else ``--config F``."""
    argv, config = sys.argv[1:], "F"
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    return f"selmatch unlock --config {shlex.quote(config)} --run_dir {shlex.quote(run_dir)}"


# --------------------------------------------------------------------------------------------
# Messages


def _busy(run_dir: str, url: str, holder: dict | None, note: str = "") -> RunDirBusyError:
    """A live holder: the kernel says someone holds the flock."""
    who = _who(holder) if holder else "another process (which has not written its name yet)"
    return RunDirBusyError(
        f"{run_dir} is being written by {who}; one command per run directory: wait for it to "
        f"finish or use another run_dir.{note}", lock=url, holder=holder or {})


def _undecidable(run_dir: str, url: str, holder: dict | None, reason: str) -> RunDirBusyError:
    """A lock nobody can tell to be stale: only the user can say that its holder is gone."""
    if holder is None:
        return RunDirBusyError(
            f"{url} names no holder (empty or damaged: a command stopped while taking the lock), "
            f"and {reason}. If no other command is writing {run_dir}: {unlock_command(run_dir)}",
            lock=url)
    return RunDirBusyError(
        f"{run_dir} is being written by {_who(holder)}, or was: {reason}. One command per run "
        f"directory: wait for it to finish or use another run_dir; if that process is gone: "
        f"{unlock_command(run_dir)}", lock=url, holder=holder)


def _held_note(holder: dict | None, me: dict, url: str) -> str:
    if not holder:
        return ""
    verdict = _judge(holder, me)
    if verdict == "gone":
        return (f" No pid {holder['pid']} of that start time runs here, yet {url} is held: by a "
                f"process it started, or from another container of this machine")
    if verdict == "elsewhere":
        return (f" If that machine stopped while holding it, the file server may keep its lock "
                f"for a while; once you know that process is gone, delete {url}")
    return ""


# --------------------------------------------------------------------------------------------
# Which filesystem: does a free flock there prove that no machine holds the lock?


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)  # \040 = space


def mount_of(path: str, mountinfo: str | None = None) -> tuple[str, frozenset[str]] | None:
    """(type, mount options) of the filesystem ``path`` lives on, from /proc/self/mountinfo
    (or the text ``mountinfo``); None where that is unknown (not Linux)."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
        except OSError:
            return None
    path = os.path.realpath(path)
    best: tuple[int, str, frozenset[str]] | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or not tail:
            continue
        point = _unescape(fields[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):  # the last, deepest mount wins
            opts = set(fields[5].split(",")) | set(tail[2].split(",") if len(tail) > 2 else ())
            best = (len(point), tail[0], frozenset(opts))
    return None if best is None else (best[1], best[2])


def shares_locks(path: str, mountinfo: str | None = None) -> tuple[bool, str]:
    """(whether every machine that can write ``path`` sees its flocks, the filesystem's type).

    True for the disks of one machine, NFS with network locking (Linux emulates flock with POSIX
    locks held by the server), CephFS and Lustre mounted with ``flock``; False for NFS mounted
    ``nolock`` or ``local_lock=flock|all`` and for anything unknown (FUSE, SMB, ...)."""
    mount = mount_of(path, mountinfo)
    if mount is None:
        return False, "unknown"
    fstype, opts = mount
    if fstype in _LOCAL_FS or fstype == "ceph":
        return True, fstype
    if fstype in ("nfs", "nfs4"):
        return not opts & {"nolock", "local_lock=flock", "local_lock=all"}, fstype
    if fstype == "lustre":
        return "flock" in opts, fstype
    return False, fstype


def _free_verdict(holder: dict | None, me: dict, url: str, path: str) -> tuple[bool, str]:
    """A lock file whose flock is free: (take it over, why). Taken over unless it names a live
    process of this machine, or another machine on a filesystem whose locks may stay local."""
    if holder is None:
        return True, (f"taking over the lock file {url}: no process holds it, and it names no "
                      f"holder (empty or damaged: a command stopped while taking the lock)")
    verdict = _judge(holder, me)
    if verdict == "ours":
        return True, ""
    if verdict == "running":
        return False, (f"pid {holder['pid']} still runs on this machine but does not hold the "
                       f"file's flock (an older selmatch?)")
    if verdict in ("gone", "restarted"):
        since = " (its machine has restarted since)" if verdict == "restarted" else ""
        return True, (f"taking over the lock {url} of {_who(holder)}, which is no longer "
                      f"running{since}")
    shared, fstype = shares_locks(os.path.dirname(os.path.abspath(path)))
    if shared:
        return True, (f"taking over the lock {url} of {_who(holder)}, which is no longer running "
                      f"(no process holds its lock, and the locks of this {fstype} filesystem "
                      f"reach every machine that writes it)")
    return False, (f"it ran on another machine, and the locks of this {fstype} filesystem may not "
                   f"reach other machines, so whether it still runs cannot be told from here")


# --------------------------------------------------------------------------------------------
# Local paths: flock, else O_EXCL


def _open(path: str) -> tuple[int, bool] | None:
    """(fd, created) of the lock file, created exclusively when missing; None when it vanished
    between the two tries (released meanwhile: try again)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        pass
    try:
        return os.open(path, flags), False
    except FileNotFoundError:
        return None


def _flock(fd: int, op: int) -> bool:
    """Try ``flock(fd, op | LOCK_NB)`` a few times (a probe holds it for an instant); False when
    another process holds it. OSError (ENOLCK, ...) when the filesystem has no flock."""
    for wait in (0.0, 0.02, 0.05):
        time.sleep(wait)
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (release unlinks it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


def _read_fd(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")


def _read_holder(path: str, *, patient: bool) -> dict | None:
    """The holder the file names; a live holder may still be writing it, so wait a little."""
    for wait in (0.0, 0.05, 0.1, 0.2) if patient else (0.0,):
        time.sleep(wait)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                holder = _parse(f.read())
        except OSError:
            holder = None
        if holder is not None:
            return holder
    return None


def _write_identity(fd: int, payload: bytes) -> None:
    os.ftruncate(fd, 0)
    done = 0
    while done < len(payload):
        done += os.pwrite(fd, payload[done:], done)
    os.fsync(fd)


def _abandon(fd: int, path: str) -> None:
    """Give up a lock file this process took (a failed write): removed if still ours; if even
    that fails, what is left is an empty file that no process holds, which the next command
    takes over (with flock)."""
    try:
        if _same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass
    os.close(fd)


def _no_flock_reason(holder: dict | None, me: dict) -> str:
    ended = ""
    if holder is not None and _judge(holder, me) in ("gone", "restarted"):
        ended = f" (pid {holder['pid']} no longer runs on this machine)"
    return (f"this filesystem does not support flock, so a lock left by a process that died cannot "
            f"be told from a live one and is never taken over automatically{ended}")


def _take_local(run_dir: str, url: str, path: str, me: dict) -> int:
    """Take the lock file ``path``; returns the fd that holds it, kept open while it is held
    (closing any fd of the file would drop the lock where flock is emulated with POSIX locks)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for _ in range(_ATTEMPTS):
        opened = _open(path)
        if opened is None:
            continue  # released between our two tries
        fd, created = opened
        try:
            locked = _flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            locked = None  # no flock here: the exclusive create alone decides
        if locked is False:
            os.close(fd)
            holder = _read_holder(path, patient=True)
            raise _busy(run_dir, url, holder, _held_note(holder, me, url))
        if locked and not _same_file(fd, path):
            os.close(fd)  # released (unlinked) after we opened it: start again
            continue
        if not created:
            holder = _parse(_read_fd(fd))
            take, why = (_free_verdict(holder, me, url, path) if locked else
                         (holder is not None and _judge(holder, me) == "ours",
                          _no_flock_reason(holder, me)))
            if not take:
                os.close(fd)
                raise _undecidable(run_dir, url, holder, why)
            if why and locked:
                log.warning("%s", why)
        _write_holder(fd, path, url, me)
        return fd
    raise _busy(run_dir, url, _read_holder(path, patient=False),
                " It was taken and released again and again while this command tried.")


def _write_holder(fd: int, path: str, url: str, me: dict) -> None:
    """Write this process's identity into the lock file it holds (fsync'ed: a crash right after
    leaves a file that names its holder). A failed write gives the lock up."""
    try:
        _write_identity(fd, (json.dumps(me) + "\n").encode())
    except BaseException as err:
        _abandon(fd, path)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write the lock {url} ({err.strerror or err}); free "
                                     f"space or fix the permissions, then run the command "
                                     f"again") from err
        raise


# --------------------------------------------------------------------------------------------
# memory:// and object stores: exclusive create where the backend has one, then read back


def _read_store(url: str) -> str | None:
    try:
        return storage.read_text(url)
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return ""


def _store_reason(url: str, holder: dict | None, me: dict) -> str:
    ended = ""
    if holder is not None and _judge(holder, me) in ("gone", "restarted"):
        ended = f" (pid {holder['pid']} no longer runs on this machine)"
    return (f"nothing on {url.split('://', 1)[0]}:// says whether the process that wrote it still "
            f"runs, so it is never taken over automatically{ended}")


def _create_exclusive(url: str, data: bytes) -> bool:
    """Create ``url`` holding ``data`` unless it exists (False). Exclusive only where the
    backend implements mode ``"xb"`` as a conditional create; the caller reads it back."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    try:
        f = fs.open(path, "xb")
    except FileExistsError:
        return False
    except (NotImplementedError, ValueError):  # no exclusive mode at all: a plain atomic write
        storage.write_bytes(url, data)
        return True
    try:
        with f:
            f.write(data)
    except FileExistsError:  # refused when committed (s3fs: If-None-Match)
        return False
    except BaseException as err:
        left = _parse(_read_store(url) or "")
        if left is None or left.get("pid") == os.getpid():  # ours, half-written: remove it
            with contextlib.suppress(Exception):
                storage.remove(url)
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            raise OSError(err.errno, f"cannot write the lock {url} ({err.strerror or err}); "
                                     f"free space or fix the permissions, then run the command "
                                     f"again") from err
        raise
    return True


def _take_store(run_dir: str, url: str, me: dict) -> None:
    payload = json.dumps(me) + "\n"
    for _ in range(_ATTEMPTS):
        text = _read_store(url)
        if text is not None:
            holder = _parse(text)
            if holder is not None and _judge(holder, me) == "ours":
                storage.remove(url)  # this process's own, never released (a test that crashed)
                continue
            raise _undecidable(run_dir, url, holder, _store_reason(url, holder, me))
        if _create_exclusive(url, payload.encode()) and _read_store(url) == payload:
            return
    raise _busy(run_dir, url, _parse(_read_store(url)))


# --------------------------------------------------------------------------------------------
# Public API


def acquire(run_dir: str, command: str) -> str:
    """Take the lock of ``run_dir`` (re-entrant in this process); returns its URL. Raises
    RunDirBusyError naming the holder when another command holds it (or may: see the module
    docstring), OSError when the lock file cannot be written."""
    url = lock_url(run_dir)
    if url in _HELD:
        _HELD[url] += 1
        return url
    me = identity(command)
    path = storage.local_path(url)
    if path is None:
        _take_store(run_dir, url, me)
    else:
        _FDS[url] = (_take_local(run_dir, url, path, me), os.getpid())
    _HELD[url] = 1
    return url


def release(url: str) -> None:
    """Undo one :func:`acquire`; the last one removes the lock file."""
    if url not in _HELD:
        return
    _HELD[url] -= 1
    if _HELD[url] > 0:
        return
    del _HELD[url]
    held = _FDS.pop(url, None)
    if held is None:
        try:
            holder = _parse(_read_store(url))
            if holder is not None and _judge(holder, identity("")) == "ours":
                storage.remove(url)
        except OSError as err:  # never hide the error that ended the command
            log.warning("could not remove the lock %s (%s); `selmatch unlock` removes it", url,
                        err)
        return
    fd, pid = held
    try:
        if pid == os.getpid() and _same_file(fd, storage.local_path(url)):  # not in a forked child
            os.unlink(storage.local_path(url))  # while holding the flock: see _take_local
    except OSError as err:
        log.warning("could not remove the lock %s (%s); no process holds it now: the next "
                    "command takes it over, or `selmatch unlock` removes it", url, err)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_dir_lock(run_dir: str, command: str | None = None) -> Iterator[str]:
    """Hold ``run_dir``'s lock for the block (see the module docstring)."""
    url = acquire(run_dir, command or " ".join(["selmatch", *sys.argv[1:2]]))
    try:
        yield url
    finally:
        release(url)


# --------------------------------------------------------------------------------------------
# Probes and `selmatch unlock`


def _refusal(run_dir: str) -> RunDirBusyError | None:
    """The error :func:`acquire` would raise now, found without taking or creating anything."""
    url = lock_url(run_dir)
    if url in _HELD:
        return None
    me = identity("")
    path = storage.local_path(url)
    if path is None:
        text = _read_store(url)
        holder = _parse(text)
        if text is None or (holder is not None and _judge(holder, me) == "ours"):
            return None
        return _undecidable(run_dir, url, holder, _store_reason(url, holder, me))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # never O_CREAT: a probe creates nothing
    except FileNotFoundError:
        return None
    try:
        try:
            free = _flock(fd, fcntl.LOCK_SH)
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
            holder = _parse(_read_fd(fd))
            ours = holder is not None and _judge(holder, me) == "ours"
            return None if ours else _undecidable(run_dir, url, holder,
                                                  _no_flock_reason(holder, me))
        if not free:
            holder = _read_holder(path, patient=True)
            return _busy(run_dir, url, holder, _held_note(holder, me, url))
        fcntl.flock(fd, fcntl.LOCK_UN)
        holder = _parse(_read_fd(fd))
        take, why = _free_verdict(holder, me, url, path)
        return None if take else _undecidable(run_dir, url, holder, why)
    finally:
        os.close(fd)


def busy_holder(run_dir: str) -> dict | None:
    """Who keeps a command from taking ``run_dir``'s lock now: the holder its lock file names
    (``pid``, ``host``, ``command``, ``started``, ...; only ``lock``, the file's URL, when it
    names none). None when nobody does: no lock, a stale one (the next command takes it over)
    or this process's own. Read-only: it creates no lock file and takes nothing over."""
    err = _refusal(run_dir)
    return None if err is None else {**err.holder, "lock": err.lock}


def check_not_busy(run_dir: str) -> None:
    """Raise the RunDirBusyError a command would meet on taking ``run_dir``'s lock now, so that
    it is refused before anything else (say, a missing earlier stage) is reported."""
    err = _refusal(run_dir)
    if err is not None:
        raise err


def unlock(run_dir: str) -> str:
    """Remove ``run_dir``'s lock for ``selmatch unlock``; returns what was done. On a local
    path only a lock no process holds is removed (RunDirBusyError naming a live holder); on an
    object store, where nothing says whether its holder lives, it is removed on the user's word."""
    url = lock_url(run_dir)
    path = storage.local_path(url)
    nothing = f"{run_dir} has no lock ({url} does not exist); nothing to do"
    if path is None:
        text = _read_store(url)
        if text is None:
            return nothing
        storage.remove(url)
        return (f"removed the lock {url} of {_named(_parse(text))}, on your word that it is gone "
                f"(nothing on {url.split('://', 1)[0]}:// can tell)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return nothing
    try:
        return _unlock_local(run_dir, url, path, fd)
    finally:
        os.close(fd)


def _named(holder: dict | None) -> str:
    return _who(holder) if holder else "no holder (the file was empty or damaged)"


def _unlock_local(run_dir: str, url: str, path: str, fd: int) -> str:
    try:
        free = _flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
        free = None
    if free is False:
        holder = _read_holder(path, patient=True)
        raise RunDirBusyError(
            f"{run_dir} is being written by {_named(holder)}: a live process holds its lock "
            f"{url}, and `selmatch unlock` never removes a held lock; wait for it to finish or "
            f"stop it. If its machine crashed while holding it on a shared filesystem, delete "
            f"{url} by hand", lock=url, holder=holder)
    holder = _parse(_read_fd(fd))
    if holder is not None and _judge(holder, identity("")) == "running":
        raise RunDirBusyError(
            f"{run_dir} is being written by {_who(holder)}, which still runs on this machine; "
            f"stop it first", lock=url, holder=holder)
    if _same_file(fd, path):
        os.unlink(path)
    if free is None:
        return (f"removed the lock {url} of {_named(holder)}, on your word that it is gone (this "
                f"filesystem has no flock to tell)")
    return f"removed the lock {url} of {_named(holder)}: no process held it"
