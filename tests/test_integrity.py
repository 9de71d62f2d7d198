"""Nothing corrupted is ever trusted, and one run directory has one writer (distill/integrity.py,
distill/lock.py). Each test damages or races a tiny digits run the way a user or a disk would and
checks the message a user sees; docs/reliability.md lists them. The two modules are imported
inside the tests that use them, so that this file also runs, and fails test by test, against code
without them."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from distill import storage
from distill.config import ConfigError
from distill.config_io import dump_yaml, load_config
from distill.distiller import Distiller
from launch.distillation import run_distill
from launch.cli import main
from tiny import config_file, prepare, run_cli, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    prepare(tiny_config(root))
    return root


def fresh(prepared, run_dir, **sections):
    for part in ("experts", "scores"):
        shutil.copytree(prepared / part, run_dir / part)
    return tiny_config(run_dir, **sections)


def flip_bits(path, tensor: torch.Tensor, every: int = 7) -> None:
    """Flip the lowest bit of every ``every``-th float of ``tensor``'s bytes inside ``path``:
    the file keeps its size and stays a valid zip that ``torch.load`` reads without complaint."""
    raw = open(path, "rb").read()
    payload = tensor.contiguous().numpy().tobytes()
    start = raw.find(payload)
    assert start >= 0, "tensor bytes not found in the file"
    data = bytearray(raw)
    for k in range(0, len(payload), 4 * every):
        data[start + k] ^= 1
    open(path, "wb").write(bytes(data))


# --------------------------------------------------------------------------------------------
# 1-2. Corrupted checkpoints and synthetic sets are never trusted


def test_bit_flipped_checkpoint_is_damaged_not_a_learning_rate_problem(prepared, tmp_path,
                                                                        capsys):
    cfg = fresh(prepared, tmp_path, distill={"iterations": 4, "checkpoint_every": 2})
    run_distill(dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, iterations=2)),
                progress=False)
    ckpt = tmp_path / "checkpoints" / "selmatch.pt"
    size = ckpt.stat().st_size
    state = torch.load(ckpt, weights_only=False)
    flip_bits(ckpt, state["distilled"])
    assert ckpt.stat().st_size == size and torch.load(ckpt, weights_only=False)  # still loads
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc, err = run_cli(capsys, "distill", "--config", config_file(cfg, tmp_path / "c.yaml"),
                      "--resume")
    assert rc == 2
    assert f"{ckpt} is damaged (its sha256 is" in err and "run without --resume to start over" in err
    assert "lr_images" not in err  # corruption is told apart from divergence
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert {p: b for p, b in after.items() if p.name != "c.yaml"} == before  # nothing written


def test_bit_flipped_synset_is_made_again_by_run_and_refused_by_evaluate(prepared, tmp_path,
                                                                          capsys, caplog):
    from launch.pipeline import run_pipeline

    cfg = fresh(prepared, tmp_path, eval={"model": "convnet", "runs": 1, "epochs": 2,
                                          "methods": ["selmatch"]}, distill={"iterations": 2})
    run_pipeline(cfg, workers=0)
    url = tmp_path / "synset" / "selmatch.pt"
    good = url.read_bytes()
    flip_bits(url, torch.load(url, weights_only=False)["images"])
    rc, err = run_cli(capsys, "evaluate", "--workers", "0", "--config",
                      config_file(cfg, tmp_path / "c.yaml"))
    assert rc == 2 and f"{url} is damaged (its sha256 is" in err
    caplog.clear()
    run_pipeline(cfg, workers=0)  # the owner makes it again (from its checkpoint)
    assert f"{url} is damaged" in caplog.text and "making it again" in caplog.text
    assert url.read_bytes() == good  # the same set again, bit for bit
    record = json.loads((tmp_path / "eval" / "selmatch.json").read_text())
    assert record["stamp"]  # evaluated from the intact set


# --------------------------------------------------------------------------------------------
# 3. A run directory that is the filesystem root


@pytest.mark.parametrize("run_dir", ["", "/", "/tmp/..", "file:///", "memory://"])
def test_empty_or_root_run_dir_is_refused(run_dir, capsys):
    before = {name: os.stat(os.path.join("/", name)).st_mtime for name in os.listdir("/")}
    rc, err = run_cli(capsys, "experts", "--workers", "0", "--config", "configs/quickstart.yaml",
                      "--run_dir", run_dir)
    assert rc == 2 and "run_dir" in err
    assert "must name a directory" in err or "is the root of its filesystem" in err
    after = {name: os.stat(os.path.join("/", name)).st_mtime for name in os.listdir("/")}
    assert set(after) == set(before)  # nothing written into the root (config.yaml, experts/)
    assert not {"config.yaml", "data.json", "experts"} & set(after)


# --------------------------------------------------------------------------------------------
# 4. One writer per run directory


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from distill.lock import run_dir_lock
    with run_dir_lock({run_dir!r}, "selmatch distill --distill.alpha 0.5"):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_writer_is_refused_naming_the_holder(prepared, tmp_path, capsys):
    from distill.lock import lock_url, run_dir_lock

    cfg = fresh(prepared, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=REPO,
                                                                   run_dir=str(tmp_path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        path = config_file(cfg, tmp_path / "c.yaml")
        for command in (["distill", "--config", path, "--distill.alpha", "0.25"],
                        ["experts", "--workers", "0", "--config", path],
                        ["scores", "--config", path], ["run", "--workers", "0", "--config", path]):
            rc, err = run_cli(capsys, *command)
            assert rc == 2, command
            assert f"{tmp_path} is being written by pid {holder.pid}" in err, command
            assert "selmatch distill --distill.alpha 0.5" in err
        assert not (tmp_path / "synset").exists()  # the refused commands wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is taken over with a warning, once
    assert os.path.exists(lock_url(str(tmp_path)))
    with run_dir_lock(str(tmp_path), "test"):
        assert json.loads(open(lock_url(str(tmp_path))).read())["pid"] == os.getpid()
    assert not os.path.exists(lock_url(str(tmp_path)))


def test_a_lock_from_another_host_is_never_taken_over(tmp_path, monkeypatch):
    """Where a free lock cannot prove its holder gone: here a shared filesystem whose locks may
    stay on one machine (NFS mounted nolock). tests/test_lock.py covers the other cases."""
    from distill import lock
    from distill.lock import RunDirBusyError, lock_url, run_dir_lock

    monkeypatch.setattr(lock, "shares_locks", lambda path, mountinfo=None: (False, "nfs"))
    storage.write_text(lock_url(str(tmp_path)), json.dumps(
        {"host": "elsewhere", "pid": 1, "command": "selmatch run", "started": "then"}))
    with pytest.raises(RunDirBusyError, match="pid 1 on elsewhere .*if that process is gone: "
                                              "selmatch unlock --config F --run_dir "):
        with run_dir_lock(str(tmp_path), "test"):
            pass
    assert os.path.exists(lock_url(str(tmp_path)))  # not taken over


def test_results_of_two_writers_never_mix_where_there_is_no_lock(prepared, tmp_path,
                                                                monkeypatch, caplog):
    """On an object store the lock cannot be exclusive; the distillation then checks that
    config.yaml and its initial set are still its own before saving its result."""
    cfg = fresh(prepared, tmp_path, distill={"iterations": 2})
    real_run = Distiller.run

    def another_writer(self, **kw):
        out = real_run(self, **kw)
        other = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, alpha=0.25))
        storage.write_text(f"{tmp_path}/config.yaml", dump_yaml(other))  # as another command
        return out

    monkeypatch.setattr(Distiller, "run", another_writer)
    from launch.distillation import ConcurrentWriterError

    with pytest.raises(ConcurrentWriterError, match="another command wrote .*config.yaml is not "
                                                    "the configuration this run wrote"):
        run_distill(cfg, progress=False)
    assert not (tmp_path / "synset" / "selmatch.pt").exists()  # the result is not saved


# --------------------------------------------------------------------------------------------
# 5. `selmatch evaluate` applies the freshness rule


def test_evaluate_refuses_a_set_made_with_other_settings(prepared, tmp_path, capsys):
    cfg = fresh(prepared, tmp_path, eval={"model": "convnet", "runs": 1, "epochs": 1,
                                          "methods": ["selmatch"]},
                distill={"alpha": 0.5, "iterations": 2})
    run_distill(cfg, progress=False)
    rc, err = run_cli(capsys, "evaluate", "--workers", "0", "--config",
                      config_file(cfg, tmp_path / "c.yaml"), "--distill.alpha", "0.25")
    assert rc == 2
    assert f"{tmp_path}/synset/selmatch.pt (distill.alpha 0.5 → 0.25)" in err
    assert not (tmp_path / "eval").exists()
    assert main(["evaluate", "--workers", "0", "--config", str(tmp_path / "c.yaml")]) == 0


# --------------------------------------------------------------------------------------------
# 6. YAML that is not what the user meant


@pytest.mark.parametrize("text,words", [
    ("distill:\n  iterations: 7\nseed: 1\ndistill:\n  alpha: 0.3\n",
     "key 'distill' appears twice in one mapping (lines 1 and 4)"),
    ("distill:\n  iterations: 7\n  alpha: 0.2\n  iterations: 8\n",
     "key 'iterations' appears twice in one mapping (lines 2 and 4)"),
    ("", "is empty (or only comments)"), ("# nothing\n", "is empty (or only comments)"),
    ("[]\n", "holds a YAML list"), ("false\n", "holds a YAML bool"), ("0\n", "holds a YAML int"),
])
def test_yaml_that_is_not_a_config_is_an_error_naming_the_file(tmp_path, text, words):
    path = tmp_path / "f.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and words in str(err.value)


# --------------------------------------------------------------------------------------------
# Weak messages: every damaged artifact names its file, the problem and the fix


def test_damaged_manifest_names_the_file_and_selmatch_experts_repairs_it(prepared, tmp_path,
                                                                         capsys, caplog):
    from distill import integrity

    cfg = fresh(prepared, tmp_path)
    path = config_file(cfg, tmp_path / "c.yaml")
    manifest = tmp_path / "experts" / "manifest.json"
    good = json.loads(manifest.read_text())
    for damage, words in ((lambda t: t[:-40], "not valid JSON"),
                          (lambda t: "[]", "holds a JSON list, not a dict"),
                          (lambda t: t.replace('"size"', '"sise"', 1), "lacks size")):
        integrity.write_text(str(manifest), damage(json.dumps(good, indent=2)))
        rc, err = run_cli(capsys, "distill", "--config", path)
        assert rc == 2 and f"{manifest} is damaged" in err and words in err, words
        assert "selmatch experts --config F" in err
    manifest.write_text(json.dumps(good))  # a bit flip without its checksum: damaged too
    rc, err = run_cli(capsys, "scores", "--config", path)
    assert rc == 2 and "the checksum file manifest.json.sha256 records" in err
    caplog.clear()
    assert main(["experts", "--workers", "0", "--config", path]) == 0  # repairs
    assert "moved aside" in caplog.text and (tmp_path / "experts" / "manifest.json.damaged").exists()
    assert json.loads(manifest.read_text())["experts"].keys() == good["experts"].keys()
    assert integrity.problem(str(manifest)) is None


def test_damaged_results_are_redone_by_their_stage(prepared, tmp_path, caplog):
    from distill import integrity

    from launch.pipeline import run_pipeline

    cfg = fresh(prepared, tmp_path, eval={"model": "convnet", "runs": 1, "epochs": 2,
                                          "methods": ["random", "window"]},
                tune={"beta_step": 0.4, "beta_epoch_fraction": 0.5})
    run_pipeline(cfg, workers=0)
    for rel in ("eval/random.json", "window/results.json"):
        (tmp_path / rel).write_text("{not json")
    caplog.clear()
    run_pipeline(cfg, workers=0)
    assert f"{tmp_path}/eval/random.json is damaged" in caplog.text
    assert f"{tmp_path}/window/results.json is damaged" in caplog.text
    assert integrity.problem(f"{tmp_path}/eval/random.json") is None
    (tmp_path / "eval" / "random.json").write_text("{}")  # a reader outside its stage: an error
    from distill.report import collect

    with pytest.raises(integrity.DamagedArtifactError, match="eval/random.json is damaged .*"
                                                             "selmatch evaluate"):
        collect(cfg)


@pytest.mark.parametrize("damage,words", [
    (lambda s: {k: v for k, v in s.items() if k != "opt_images"}, "missing key(s) opt_images"),
    (lambda s: [1, 2, 3], "holds a list, not a dict"),
])
def test_checkpoint_missing_a_key_or_not_a_dict_names_the_file(prepared, tmp_path, capsys,
                                                               damage, words):
    from distill import integrity

    cfg = fresh(prepared, tmp_path, distill={"iterations": 2, "checkpoint_every": 2})
    run_distill(cfg, progress=False)
    url = f"{tmp_path}/checkpoints/selmatch.pt"
    integrity.torch_save(url, damage(torch.load(url, weights_only=False)))
    rc, err = run_cli(capsys, "distill", "--config", config_file(cfg, tmp_path / "c.yaml"),
                      "--resume", "--distill.iterations", "4")
    assert rc == 2 and f"{url} is damaged ({words})" in err and "Traceback" not in err


def test_synset_of_the_wrong_shape_names_the_file(prepared, tmp_path, capsys):
    from distill import integrity

    cfg = fresh(prepared, tmp_path, eval={"model": "convnet", "runs": 1, "epochs": 1,
                                          "methods": ["selmatch"]}, distill={"iterations": 1})
    run_distill(cfg, progress=False)
    url = f"{tmp_path}/synset/selmatch.pt"
    state = torch.load(url, weights_only=False)
    state["images"] = torch.zeros(len(state["labels"]), 1, 28, 28)  # made for other data
    integrity.torch_save(url, state)
    from distill.artifacts import Ref
    from distill.data import load_configured
    from distill.freshness import Freshness
    from launch.stages import ReferenceCache, stage_evaluate

    ds = load_configured(cfg.data)
    check = Freshness(cfg)
    with pytest.raises(integrity.DamagedArtifactError,
                       match=r"synset/selmatch.pt is damaged \(images of shape \[1, 28, 28\], "
                             r"but the dataset's are \[1, 8, 8\]: made for other data\)"):
        stage_evaluate(check, [Ref("evaluation", "selmatch", cfg.seed)], ds,
                       ReferenceCache(check, ds), workers=0)


def test_scores_file_of_strings_names_the_file(tmp_path, capsys):
    bad = tmp_path / "s.npy"
    np.save(bad, np.array(["a"] * 1438))
    rc, err = run_cli(capsys, "scores", "--config", "configs/quickstart.yaml", "--run_dir",
                      str(tmp_path / "r"), "--scores.file", str(bad))
    assert rc == 2 and f"scores.file {bad} holds <U1 values, not numbers" in err


def test_a_failed_write_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.LocalFileOpener, "write", full)
    with pytest.raises(OSError) as err:
        storage.write_bytes(str(tmp_path / "synset" / "x.pt"), b"12345")
    assert err.value.errno == errno.ENOSPC
    assert f"cannot write {tmp_path}/synset/x.pt (No space left on device)" in str(err.value)
    assert os.listdir(tmp_path / "synset") == []


def test_one_class_dataset_is_refused_up_front(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs" / "train" / "cat"
    folder.mkdir(parents=True)
    for k in range(4):
        Image.new("L", (8, 8), color=k * 40).save(folder / f"{k}.png")
    with pytest.raises(ConfigError, match="has 1 class"):
        tiny_config(tmp_path / "r", data={"name": "imagefolder", "root": str(tmp_path / "imgs"),
                                          "train_per_class": None,
                                          "options": {"val_fraction": 0.25}},
                    select={"ipc": 1, "beta": 0.0})


def test_memory_run_dir_with_ray_workers_is_refused_up_front(capsys):
    rc, err = run_cli(capsys, "experts", "--config", "configs/quickstart.yaml",
                      "--run_dir", "memory://ray-refused")
    assert rc == 2 and "lives in this process's memory, which Ray workers cannot write" in err
    assert "--workers 0" in err
    rc, err = run_cli(capsys, "tune", "--config", "configs/quickstart.yaml",
                      "--run_dir", "memory://ray-refused")
    assert rc == 2  # missing stages come first here; with them present Ray is refused too


def test_accelerate_launch_bad_input_is_one_message_exit_2_per_rank(tmp_path):
    """Under `accelerate launch` rank 0 alone reports bad input; every rank exits 2, and the
    launcher (which prints its own summary, docs/reliability.md) exits non-zero."""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
         "launch/accelerate/cpu_2proc.yaml", "--main_process_port", "0", "distill/main.py",
         "--config", "configs/quickstart.yaml", "--run_dir", str(tmp_path), "--distill.alpha",
         "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("distill.alpha must be in [0, 1], got 2") == 1
    assert "exitcode  : 2" in out  # rank 0's status, as the launcher reports it
