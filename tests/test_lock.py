"""The run-directory lock (distill/lock.py) under races, crashes, full disks and look-alike
machines. Competing commands are real processes: the lock's promises are about processes, and a
thread of this one would share its re-entrant hold. docs/reliability.md lists these tests with the
messages a user sees."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from distill import lock, storage
from launch.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quickstart.yaml")

RACER = textwrap.dedent("""
    import logging, os, sys, time, traceback
    sys.path.insert(0, {repo!r})
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from distill.lock import RunDirBusyError, acquire, release
    url = None
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "go":  # wait for the common start time, then race
            time.sleep(max(0.0, float(arg) - time.time()))
            try:
                url, out = acquire({run_dir!r}, "racer"), "won"
            except RunDirBusyError:
                out = "busy"
            except BaseException:
                out = "crash " + traceback.format_exc().replace(chr(10), " | ")
            print(out, flush=True)
        elif command == "release":
            if url is not None:
                release(url)
                url = None
            print("released", flush=True)
""")

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from distill.lock import run_dir_lock
    with run_dir_lock({run_dir!r}, "selmatch distill --distill.alpha 0.5"):
        print("locked", flush=True)
        time.sleep(120)
""")

ONCE = textwrap.dedent("""
    import logging, os, sys
    sys.path.insert(0, {repo!r})
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from distill.lock import run_dir_lock
    with run_dir_lock({run_dir!r}, "second"):
        print(open({path!r}).read(), end="", flush=True)
""")


def _line(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"process {proc.pid} said nothing for {timeout} s"
    return proc.stdout.readline().strip()


def _holder(run_dir) -> subprocess.Popen:
    """A process holding ``run_dir``'s lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=REPO, run_dir=str(run_dir))],
                            stdout=subprocess.PIPE, text=True)
    assert _line(proc) == "locked"
    return proc


def _once(run_dir) -> subprocess.CompletedProcess:
    """Another command taking and releasing the lock; prints the lock file it wrote."""
    script = ONCE.format(repo=REPO, run_dir=str(run_dir), path=lock.lock_url(str(run_dir)))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _lookalike(**changes) -> dict:
    """The identity of a process that is not running here, with ``changes``."""
    holder = {**lock.identity("selmatch run --config F"), "pid": _dead_pid(), "pid_start": 1}
    return {**holder, **changes}


def _write(url: str, text: str) -> None:
    path = storage.local_path(url)
    if path is None:
        storage.write_text(url, text)
    else:
        with open(path, "w") as f:  # in place: a holder's flock on the file stays
            f.write(text)


# --------------------------------------------------------------------------------------------
# Races


def _stale(run_dir, round_: int) -> str:
    """Leave a lock file that no process holds, of a kind that depends on the round."""
    url = lock.lock_url(str(run_dir))
    kind = ["killed", "dead pid", "empty", "other machine", "earlier boot", "none"][round_ % 6]
    if kind == "killed":
        proc = _holder(run_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    elif kind == "dead pid":
        _write(url, json.dumps(_lookalike()))
    elif kind == "empty":
        _write(url, "")
    elif kind == "other machine" and lock.shares_locks(str(run_dir))[0]:
        _write(url, json.dumps(_lookalike(machine_id="0" * 32, boot_id="other boot")))
    elif kind == "earlier boot":
        _write(url, json.dumps(_lookalike(boot_id="an earlier boot")))
    return kind


def _race(tmp_path, rounds: int, racers: int = 4) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = RACER.format(repo=REPO, run_dir=str(run_dir))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(racers)]
    try:
        assert all(_line(p, 120) == "ready" for p in procs)
        for r in range(rounds):
            kind = _stale(run_dir, r)
            start = time.time() + 0.1
            for p in procs:
                p.stdin.write(f"go {start}\n")
                p.stdin.flush()
            said = [_line(p) for p in procs]
            assert not [s for s in said if s not in ("won", "busy")], (r, kind, said)
            assert said.count("won") == 1, (r, kind, said)
            winner = procs[said.index("won")].pid
            assert json.loads((run_dir / lock.NAME).read_text())["pid"] == winner
            for p in procs:
                p.stdin.write("release\n")
                p.stdin.flush()
            assert all(_line(p) == "released" for p in procs)
            assert not (run_dir / lock.NAME).exists()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_processes_racing_on_a_stale_lock_have_exactly_one_winner(tmp_path):
    """4 processes start together on a lock left by a SIGKILLed holder (or an empty file, a
    dead pid, an earlier boot, another machine, no file): every round exactly one wins and the
    others are refused; none crashes."""
    _race(tmp_path, rounds=30)


def test_a_live_flock_is_never_taken_over_whatever_the_file_says(tmp_path, capsys):
    holder = _holder(tmp_path)
    url = lock.lock_url(str(tmp_path))
    try:
        for text in ("", json.dumps(_lookalike()),
                     json.dumps(_lookalike(machine_id="0" * 32, boot_id="other boot"))):
            _write(url, text)
            with pytest.raises(lock.RunDirBusyError, match=f"{tmp_path} is being written by"):
                lock.acquire(str(tmp_path), "test")
            assert lock.busy_holder(str(tmp_path))["lock"] == url
        _write(url, json.dumps(_lookalike(pid=holder.pid, command="the holder")))
        assert main(["unlock", "--config", QUICK, "--run_dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "never removes a held lock" in err
        assert os.path.exists(url) and not lock._HELD
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------------------------
# Machines that share a host name


@pytest.mark.parametrize("where", ["no flock", "memory", "local locks only"])
@pytest.mark.parametrize("other", [{"machine_id": "0" * 32, "boot_id": "other boot"},
                                   {"boot_id": "other boot", "machine_id": None}])
def test_another_machine_with_the_same_hostname_is_never_taken_over(tmp_path, monkeypatch,
                                                                    where, other):
    """A lock naming a process of another machine with this host name (its pid does not run
    here) is refused wherever a free lock cannot prove that process gone: a filesystem
    without flock, an object store (memory://), a filesystem whose locks may stay local."""
    run_dir = "memory://same-host" if where == "memory" else str(tmp_path)
    if where == "no flock":
        monkeypatch.setattr(lock.fcntl, "flock", _no_flock)
    if where == "local locks only":
        monkeypatch.setattr(lock, "shares_locks", lambda path, mountinfo=None: (False, "nfs4"))
    holder = _lookalike(**other)
    _write(lock.lock_url(run_dir), json.dumps(holder))
    with pytest.raises(lock.RunDirBusyError) as err:
        lock.acquire(run_dir, "test")
    assert f"pid {holder['pid']} on {holder['host']}" in str(err.value)
    assert f"selmatch unlock --config F --run_dir {run_dir}" in str(err.value)
    assert json.loads(storage.read_text(lock.lock_url(run_dir))) == holder  # untouched
    assert lock.busy_holder(run_dir)["pid"] == holder["pid"] and not lock._HELD
    storage.remove(lock.lock_url(run_dir))


def _no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")


def test_where_locks_reach_every_machine_a_free_lock_of_another_one_is_taken_over(
        tmp_path, caplog):
    assert lock.shares_locks(str(tmp_path))[0]  # the test's tmp dir is on a local disk
    holder = _lookalike(machine_id="0" * 32, boot_id="other boot")
    _write(lock.lock_url(str(tmp_path)), json.dumps(holder))
    with lock.run_dir_lock(str(tmp_path), "test"):
        pass
    assert f"of pid {holder['pid']} on {holder['host']}" in caplog.text
    assert "which is no longer running" in caplog.text


ROOT = "27 1 254:0 / / rw - ext4 /dev/vda rw\n"


@pytest.mark.parametrize("mount,path,expected", [
    ("36 27 0:44 / /shared rw - nfs4 srv:/x rw,vers=4.2,local_lock=none", "/shared/r",
     (True, "nfs4")),
    ("36 27 0:44 / /shared rw - nfs srv:/x rw,vers=3,nolock,local_lock=all", "/shared/r",
     (False, "nfs")),
    ("36 27 0:44 / /shared rw - nfs4 srv:/x rw,local_lock=flock", "/shared/r", (False, "nfs4")),
    ("36 27 0:44 / /shared rw - fuse.sshfs u@h:/x rw,user_id=0", "/shared/r",
     (False, "fuse.sshfs")),
    ("36 27 0:44 / /sh\\040ared rw - cifs //s/x rw", "/sh ared/r", (False, "cifs")),
    ("36 27 0:44 / /shared rw - cifs //s/x rw", "/sharedness/r", (True, "ext4")),
])
def test_which_filesystems_share_their_locks_between_machines(mount, path, expected):
    assert lock.shares_locks(path, ROOT + mount + "\n") == expected
    assert lock.shares_locks(path, "") == (False, "unknown")


# --------------------------------------------------------------------------------------------
# A full disk, an empty file


@pytest.mark.parametrize("call", ["pwrite", "fsync"])
def test_a_full_disk_while_taking_the_lock_leaves_nothing_that_blocks(tmp_path, monkeypatch,
                                                                       call):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    url = lock.lock_url(str(tmp_path))
    with monkeypatch.context() as m:
        m.setattr(os, call, full)
        with pytest.raises(OSError, match=f"cannot write the lock {url} \\(No space left"):
            lock.acquire(str(tmp_path), "test")
    assert not lock._HELD and not lock._FDS and not os.path.exists(url)
    second = _once(tmp_path)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["command"] == "second"


def test_a_full_disk_that_leaves_an_empty_lock_file_does_not_block(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    url = lock.lock_url(str(tmp_path))
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full)
        m.setattr(os, "unlink", full)  # even the clean-up fails
        with pytest.raises(OSError, match="No space left"):
            lock.acquire(str(tmp_path), "test")
    assert open(url).read() == ""
    second = _once(tmp_path)  # another command: taken over with a warning, not blocked
    assert second.returncode == 0, second.stderr
    assert f"WARNING:distill.lock:taking over the lock file {url}: no process holds it" \
           in second.stderr


def test_an_empty_lock_file_is_taken_over_on_a_local_disk(tmp_path, caplog):
    url = lock.lock_url(str(tmp_path))
    _write(url, "")
    with lock.run_dir_lock(str(tmp_path), "test"):
        assert json.loads(open(url).read())["pid"] == os.getpid()
    assert f"taking over the lock file {url}: no process holds it" in caplog.text
    assert not os.path.exists(url)


@pytest.mark.parametrize("where", ["memory", "no flock"])
def test_an_empty_lock_file_that_cannot_be_judged_names_its_path_and_the_fix(tmp_path,
                                                                             monkeypatch, where):
    run_dir = "memory://empty-lock" if where == "memory" else str(tmp_path)
    if where == "no flock":
        monkeypatch.setattr(lock.fcntl, "flock", _no_flock)
    url = lock.lock_url(run_dir)
    _write(url, "")
    with pytest.raises(lock.RunDirBusyError) as err:
        lock.acquire(run_dir, "test")
    assert f"{url} names no holder (empty or damaged" in str(err.value)
    assert f"selmatch unlock --config F --run_dir {run_dir}" in str(err.value)
    assert lock.busy_holder(run_dir) == {"lock": url}
    assert lock.unlock(run_dir).startswith(f"removed the lock {url} of no holder")
    with lock.run_dir_lock(run_dir, "test"):  # the command then goes on
        pass


# --------------------------------------------------------------------------------------------
# selmatch unlock, busy_holder, re-entrancy


def test_selmatch_unlock_removes_a_stale_lock_and_says_when_there_is_none(tmp_path, capsys):
    url = lock.lock_url(str(tmp_path))
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert main(["unlock", "--config", QUICK, "--run_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"removed the lock {url} of pid {holder.pid}" in out and "no process held it" in out
    assert not os.path.exists(url)
    assert main(["unlock", "--config", QUICK, "--run_dir", str(tmp_path)]) == 0
    assert f"{tmp_path} has no lock" in capsys.readouterr().out


def test_selmatch_unlock_on_an_object_store_takes_the_users_word(capsys):
    run_dir = "memory://unlock-me"
    _write(lock.lock_url(run_dir), json.dumps(_lookalike(machine_id="0" * 32)))
    assert main(["unlock", "--config", QUICK, "--run_dir", run_dir]) == 0
    assert "on your word that it is gone" in capsys.readouterr().out
    assert not storage.exists(lock.lock_url(run_dir))


def test_busy_holder_creates_nothing_and_reports_a_live_holder(tmp_path):
    url = lock.lock_url(str(tmp_path))
    assert lock.busy_holder(str(tmp_path)) is None and not os.path.exists(url)
    lock.check_not_busy(str(tmp_path))
    assert lock.busy_holder(str(tmp_path / "missing")) is None
    assert not (tmp_path / "missing").exists()
    holder = _holder(tmp_path)
    try:
        found = lock.busy_holder(str(tmp_path))
        assert found["pid"] == holder.pid and found["lock"] == url
        assert found["command"] == "selmatch distill --distill.alpha 0.5"
        with pytest.raises(lock.RunDirBusyError, match=f"being written by pid {holder.pid}"):
            lock.check_not_busy(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert lock.busy_holder(str(tmp_path)) is None  # its holder died: stale, no longer busy
    assert os.path.exists(url)  # ... and the probe took nothing over


def test_the_lock_is_reentrant_and_released_once(tmp_path):
    url = lock.lock_url(str(tmp_path))
    with lock.run_dir_lock(str(tmp_path), "outer"):
        with lock.run_dir_lock(str(tmp_path), "inner"):
            assert lock.busy_holder(str(tmp_path)) is None  # our own
        assert json.loads(open(url).read())["command"] == "outer"
        assert _once(tmp_path).returncode != 0  # still held after the inner block
    assert not os.path.exists(url) and not lock._HELD and not lock._FDS
