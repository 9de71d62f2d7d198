"""Nothing in a run directory can run code, and no crash or full disk leaves it unusable
(distill/integrity.py). Each test crafts what a hostile or unlucky run directory holds and checks
what the user sees; docs/reliability.md lists the messages."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil

import pytest
import torch

from distill import integrity, storage
from distill.config_io import dump_yaml
from launch.distillation import run_distill
from tiny import prepare, run_cli, tiny_config


class Payload:
    """What a hostile pickle carries: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    cfg = prepare(tiny_config(root))
    run_distill(cfg, progress=False)  # synset/selmatch.pt, checkpoints/selmatch.pt
    return root


def copy_run(prepared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    cfg = tiny_config(run)
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    return run, cfg, str(path)


def poison(url: str, marker) -> None:
    """Add a payload to the torch dict at ``url``."""
    state = torch.load(url)
    state["extra"] = Payload(marker)
    torch.save(state, url)


def resign(url: str, *, sign: bool) -> None:
    """Recompute ``url``'s sidecar as an attacker would, or remove it."""
    if sign:
        integrity.write_bytes(url, open(url, "rb").read())
    else:
        os.remove(integrity.sidecar(url))


@pytest.mark.parametrize("sign", [True, False], ids=["sidecar recomputed", "sidecar removed"])
@pytest.mark.parametrize("artifact", ["checkpoint", "synset", "expert"])
def test_a_payload_never_runs_and_the_file_is_named(prepared, tmp_path, capsys, artifact, sign):
    run, cfg, path = copy_run(prepared, tmp_path)
    marker = tmp_path / "PWNED"
    if artifact == "checkpoint":
        url = f"{run}/checkpoints/selmatch.pt"
        argv = ["distill", "--config", path, "--resume", "--distill.iterations", "6"]
    elif artifact == "synset":
        url = f"{run}/synset/selmatch.pt"
        argv = ["evaluate", "--workers", "0", "--config", path, "--eval.methods", "[selmatch]"]
    else:
        url = f"{run}/experts/expert_0001.pt"  # the scores are made from it
        argv = ["scores", "--config", path]
    poison(url, marker)
    named = url
    if artifact == "expert":  # its checksum is in the manifest, which the attacker rewrites
        manifest = f"{run}/experts/manifest.json"
        entry = json.loads(open(manifest).read())
        entry["experts"]["1"].update(size=os.path.getsize(url), sha256=storage.sha256(url))
        storage.write_json(manifest, entry)
        resign(manifest, sign=sign)
        named = url if sign else manifest
    else:
        resign(url, sign=sign)
    rc, err = run_cli(capsys, *argv)
    assert not marker.exists(), "the payload ran"
    assert rc == 2 and named in err, err
    if sign:
        assert "is refused" in err and "could run code" in err and "posix.system" in err


def test_everything_the_product_writes_loads_without_pickled_code(prepared):
    """weights_only=True reads every torch file of a finished run (a regression here would make
    every run directory unreadable, not merely unsafe)."""
    urls = [str(p) for p in prepared.rglob("*.pt")]
    assert len(urls) >= 4
    for url in urls:
        integrity.torch_from_bytes(url, open(url, "rb").read(), fix="-")


# --------------------------------------------------------------------------------------------
# Write order: a crash or a full disk at any point leaves the old or the new pair
# --------------------------------------------------------------------------------------------


def failing_write(monkeypatch, at: int, error: BaseException):
    """storage.write_bytes raising ``error`` at its ``at``-th call (0-based)."""
    real, calls = storage.write_bytes, []

    def write(url, data):
        calls.append(url)
        if len(calls) - 1 == at:
            raise error
        return real(url, data)

    monkeypatch.setattr(storage, "write_bytes", write)
    return calls


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt()], ids=["ENOSPC", "killed"])
@pytest.mark.parametrize("at", [0, 1, 2])
def test_replacing_an_artifact_leaves_the_old_or_the_new_pair(tmp_path, monkeypatch, at, error):
    url = f"{tmp_path}/a.bin"
    integrity.write_bytes(url, b"old")
    calls = failing_write(monkeypatch, at, error)
    with pytest.raises(type(error)):
        integrity.write_bytes(url, b"new")
    monkeypatch.undo()
    assert len(calls) == at + 1
    assert integrity.read_bytes(url, fix="-") == (b"old" if at <= 1 else b"new")
    integrity.write_bytes(url, b"newer")  # and the next write goes through
    assert integrity.read_bytes(url, fix="-") == b"newer"
    assert open(integrity.sidecar(url)).read().count("\n") == 1


def test_a_first_write_that_fails_leaves_nothing_that_reads_as_present(tmp_path, monkeypatch):
    url = f"{tmp_path}/a.bin"
    failing_write(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError):
        integrity.write_bytes(url, b"new")
    monkeypatch.undo()
    assert integrity.problem(url) == "missing"


@pytest.mark.parametrize("at", [0, 1, 2])
def test_full_disk_at_a_checkpoint_then_resume_ends_as_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                            at):
    """ENOSPC at each point of the second checkpoint's write: the run fails, ``--resume``
    continues from the last good checkpoint and ends bit for bit where a run without the fault
    ends."""
    base = prepare(tiny_config(tmp_path / "whole", distill={"iterations": 6}))
    whole = run_distill(base, progress=False)
    cfg = dataclasses.replace(base, run_dir=str(tmp_path / "faulty"))
    for part in ("experts", "scores"):
        shutil.copytree(f"{base.run_dir}/{part}", f"{cfg.run_dir}/{part}")
    ckpt = f"{cfg.run_dir}/checkpoints/selmatch.pt"
    real, seen = storage.write_bytes, []

    def write(url, data):
        if url.startswith(ckpt):
            seen.append(url)
            if len(seen) == 3 + at:  # the first checkpoint takes 1 + 1 writes, then 3 each
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(url, data)

    monkeypatch.setattr(storage, "write_bytes", write)
    with pytest.raises(OSError, match="No space left on device"):
        run_distill(cfg, progress=False)
    monkeypatch.undo()
    state = integrity.torch_load(ckpt, fix="-")  # the pair on storage is readable
    assert state["iteration"] == (2 if at <= 1 else 4)
    resumed = run_distill(cfg, resume=True, progress=False)
    assert torch.equal(resumed.images().detach(), whole.images().detach())
    assert float(resumed.syn_lr.detach()) == float(whole.syn_lr.detach())


# --------------------------------------------------------------------------------------------
# Messages a user can act on
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, words", [
    (lambda text: text[:40], "not a line '<64 hex digits>  selmatch.pt' (truncated or edited)"),
    (lambda text: "", "is empty"),
    (lambda text: b"\xff\xfe" + text.encode(), "is not UTF-8 text"),
    (lambda text: text.replace("selmatch.pt", "selmatch_init.pt"),
     "is the checksum of 'selmatch_init.pt', not of 'selmatch.pt'"),
], ids=["truncated", "empty", "not UTF-8", "another file's"])
def test_a_damaged_sidecar_is_named_with_what_is_wrong(prepared, tmp_path, capsys, damage, words):
    run, cfg, path = copy_run(prepared, tmp_path)
    side = f"{run}/synset/selmatch.pt.sha256"
    new = damage(open(side).read())
    with open(side, "wb") as f:
        f.write(new if isinstance(new, bytes) else new.encode())
    rc, err = run_cli(capsys, "evaluate", "--workers", "0", "--config", path,
                      "--eval.methods", "[selmatch]")
    assert rc == 2 and f"{run}/synset/selmatch.pt is damaged (its checksum file {side}" in err
    assert words in err and "re-create it with `selmatch run`" in err


def test_the_initial_set_copied_over_the_final_one_is_refused(prepared, tmp_path, capsys):
    run, cfg, path = copy_run(prepared, tmp_path)
    for suffix in ("", ".sha256"):
        shutil.copy(f"{run}/synset/selmatch_init.pt{suffix}", f"{run}/synset/selmatch.pt{suffix}")
    rc, err = run_cli(capsys, "evaluate", "--workers", "0", "--config", path,
                      "--eval.methods", "[selmatch]")
    assert rc == 2 and f"{run}/synset/selmatch.pt is damaged" in err
    assert "copied over another artifact" in err


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update(iteration="4"), "iteration is '4', not an integer >= 0"),
    (lambda s: s.update(distilled=s["distilled"][:3]), "distilled has shape [3, 1, 8, 8], this "
                                                       "run's is [20, 1, 8, 8]"),
    (lambda s: s.update(history={}), "history is a dict, not a list"),
], ids=["iteration", "shape", "history"])
def test_a_resigned_checkpoint_of_other_types_names_the_file_and_field(prepared, tmp_path, capsys,
                                                                       change, words):
    run, cfg, path = copy_run(prepared, tmp_path)
    url = f"{run}/checkpoints/selmatch.pt"
    state = integrity.torch_load(url, fix="-")
    change(state)
    integrity.torch_save(url, state)
    rc, err = run_cli(capsys, "distill", "--config", path, "--resume",
                      "--distill.iterations", "6")
    assert rc == 2 and f"{url} is damaged ({words}" in err, err
    assert "run without --resume to start over" in err


def test_a_resigned_set_of_the_wrong_shape_is_remade_by_run(prepared, tmp_path, capsys):
    """evaluate refuses it and says to run `selmatch run`; run then makes it again instead of
    skipping it as fresh (and failing the same way)."""
    run, cfg, path = copy_run(prepared, tmp_path)
    url = f"{run}/synset/selmatch.pt"
    state = integrity.torch_load(url, fix="-")
    state["images"] = state["images"][:, :, :4, :4].contiguous()
    integrity.torch_save(url, state)
    rc, err = run_cli(capsys, "evaluate", "--workers", "0", "--config", path,
                      "--eval.methods", "[selmatch]")
    assert rc == 2 and url in err and "made for other data" in err
    rc, err = run_cli(capsys, "run", "--workers", "0", "--config", path, "--eval.methods",
                      "[selmatch]", "--eval.runs", "1", "--eval.epochs", "1")
    assert rc == 0, err
    assert tuple(integrity.torch_load(url, fix="-")["images"].shape[2:]) == (8, 8)


@pytest.mark.parametrize("field", ["scores.file", "scores.topk_file"])
def test_a_directory_as_a_scores_file_names_the_field(tmp_path, capsys, field):
    cfg = tiny_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    rc, err = run_cli(capsys, "config", "show", "--config", str(path), f"--{field}",
                      str(tmp_path))
    assert rc == 2 and f"{field} {tmp_path} is a directory; give a .npy or .npz file" in err


def test_a_chained_url_as_run_dir_is_refused_before_anything_is_written(tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    before = sorted(os.listdir(tmp_path))
    rc, err = run_cli(capsys, "experts", "--workers", "0", "--config", str(path),
                      "--run_dir", "a::b")
    assert rc == 2 and "run_dir 'a::b' contains '::'" in err
    assert sorted(os.listdir(tmp_path)) == before
