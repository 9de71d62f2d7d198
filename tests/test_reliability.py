"""Nothing wrong exits 0: stale artifacts, non-finite settings, blown-up runs, damaged
experts, refused resumes that wrote anyway, tracebacks instead of messages, thread-count bits.

docs/reliability.md lists every case here with the message a user sees. CLI cases call
``launch.cli.main`` in-process: an exception that escapes it (a traceback) fails the test.
Modules that did not exist before the fix are imported inside the tests that need them, so the
file also runs against the code before it (every test here failed there; see the issue notes).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import socket
import typing

import numpy as np
import pytest
import torch

from distill import integrity, storage
from distill.config import ConfigError, RunConfig
from distill.config_io import from_dict
from distill.distiller import DivergenceError, Distiller
from launch.distillation import run_distill
from distill.synset import load_synset
from distill.trajectories import ExpertStore
from launch.experts import run_experts
from tiny import config_file, prepare, run_cli, tiny_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    prepare(tiny_config(root))
    return root


def fresh(prepared, run_dir, **sections) -> RunConfig:
    for part in ("experts", "scores"):
        shutil.copytree(prepared / part, run_dir / part)
    return tiny_config(run_dir, **sections)


# --------------------------------------------------------------------------------------------
# 1. Freshness: one rule for every stage; a longer run continues from its checkpoint
# --------------------------------------------------------------------------------------------


def test_longer_distillation_is_stale_and_continues_from_its_checkpoint(prepared, tmp_path,
                                                                        caplog):
    from launch.distillation import distill_set

    def stage_distill(cfg, _, name):  # what selmatch run does for one set
        distill_set(cfg, name, resume=True, restart_stale=True, progress=False)

    short = fresh(prepared, tmp_path / "r", distill={"iterations": 2, "checkpoint_every": 2})
    stage_distill(short, short, "selmatch")
    longer = dataclasses.replace(short, distill=dataclasses.replace(short.distill, iterations=4))
    caplog.set_level("INFO")
    stage_distill(longer, longer, "selmatch")  # must not be "present, skipped"
    assert "resumed from" in caplog.text and "at iteration 2" in caplog.text
    _, got = load_synset(longer.run_dir, "selmatch")
    assert got["meta"]["iterations"] == 4

    straight = fresh(prepared, tmp_path / "s", distill={"iterations": 4, "checkpoint_every": 2})
    run_distill(straight, progress=False)
    _, want = load_synset(straight.run_dir, "selmatch")
    assert torch.equal(got["images"], want["images"])  # 2 + 2 == 4, bit for bit
    # and a shorter run than the checkpoint starts over instead of reusing 4 iterations
    stage_distill(short, short, "selmatch")
    _, again = load_synset(short.run_dir, "selmatch")
    assert again["meta"]["iterations"] == 2 and not torch.equal(again["images"], got["images"])


# --------------------------------------------------------------------------------------------
# 2. Every float field rejects NaN and ±inf, naming the field
# --------------------------------------------------------------------------------------------


def _float_fields(cls=RunConfig, prefix="") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += _float_fields(t, f"{prefix}{f.name}.")
        elif t is float or float in typing.get_args(t):
            out.append(f"{prefix}{f.name}")
    return out


FLOAT_FIELDS = _float_fields()


def test_the_float_fields_are_found():
    assert {"experts.lr", "eval.lr", "distill.alpha", "select.beta", "distill.lr_images",
            "tune.alpha_fraction"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_every_float_field_rejects_non_finite_values(field, value):
    section, name = field.split(".")
    with pytest.raises(ConfigError) as info:
        from_dict({section: {name: value}})
    assert f"{field} must be a finite number, got {value}" in info.value.problems


def test_nan_on_the_command_line_exits_2_naming_the_field(capsys):
    rc, err = run_cli(capsys, "config", "show", "--config", "configs/quickstart.yaml",
                      "--experts.lr", ".nan", "--eval.lr", ".inf")
    assert rc == 2
    assert "experts.lr must be a finite number, got nan" in err
    assert "eval.lr must be a finite number, got inf" in err


# --------------------------------------------------------------------------------------------
# 3. A blown-up but finite run stops; an expert at chance is reported loudly
# --------------------------------------------------------------------------------------------


def test_blown_up_images_stop_the_run_with_a_clear_error(prepared, tmp_path, capsys):
    cfg = fresh(prepared, tmp_path, distill={"lr_images": 1e12})
    rc, err = run_cli(capsys, "distill", "--config", config_file(cfg, tmp_path / "c.yaml"))
    assert rc == 1
    assert "diverged at iteration 0" in err and "distill.max_image_ratio" in err
    assert "distill.lr_images (now 1e+12)" in err
    assert not storage.exists(f"{tmp_path}/synset/selmatch.pt")


def test_a_jumping_student_learning_rate_stops_the_run_naming_lr_lr(prepared, tmp_path, capsys):
    cfg = fresh(prepared, tmp_path, distill={"lr_lr": 10.0, "iterations": 3,
                                             "checkpoint_every": 1})
    rc, err = run_cli(capsys, "distill", "--config", config_file(cfg, tmp_path / "c.yaml"))
    assert rc == 1
    assert "the learned student learning rate syn_lr" in err and "at iteration 0" in err
    hint = re.search(r"set distill\.lr_lr to ([0-9.e+-]+) or less \(now 10\)", err)
    assert hint, err  # a value that would have kept the update within the bound
    assert not storage.exists(f"{tmp_path}/synset/selmatch.pt")
    # the suggested lr_lr runs where 10 stopped
    cfg = fresh(prepared, tmp_path / "again", distill={"lr_lr": float(hint.group(1)),
                                                      "iterations": 1})
    rc, err = run_cli(capsys, "distill", "--config", config_file(cfg, tmp_path / "c2.yaml"))
    assert rc == 0, err


def _poisoned_step(at: int, *, scale: float = 1.0, loss: float | None = None):
    real = Distiller.step

    def step(self, iteration):
        record = real(self, iteration)
        if iteration == at:
            with torch.no_grad():
                self.synset.distilled.mul_(scale)
            if loss is not None:
                record["loss"] = loss
        return record

    return step


def test_blow_up_keeps_the_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    cfg = fresh(prepared, tmp_path, distill={"iterations": 6, "checkpoint_every": 2})
    monkeypatch.setattr(Distiller, "step", _poisoned_step(3, scale=1e6))  # finite, far out
    with pytest.raises(DivergenceError, match="iteration 3.*max_image_ratio"):
        run_distill(cfg, progress=False)
    ckpt = integrity.torch_load(f"{tmp_path}/checkpoints/selmatch.pt", fix="-")
    assert ckpt["iteration"] == 2 and float(ckpt["distilled"].abs().max()) < 10
    assert not storage.exists(f"{tmp_path}/synset/selmatch.pt")


def test_loss_far_above_its_start_stops_the_run(prepared, tmp_path, monkeypatch):
    cfg = fresh(prepared, tmp_path, distill={"iterations": 8, "checkpoint_every": 2})
    monkeypatch.setattr(Distiller, "step", _poisoned_step(6, loss=1e4))
    with pytest.raises(DivergenceError, match="iteration 6.*loss 1e\\+04.*max_loss_ratio"):
        run_distill(cfg, progress=False)
    assert integrity.torch_load(f"{tmp_path}/checkpoints/selmatch.pt", fix="-")["iteration"] == 6


def test_expert_at_chance_is_reported_loudly(tmp_path, caplog):
    cfg = tiny_config(tmp_path, experts={"lr": 1e-12, "num_experts": 1})
    caplog.set_level("WARNING")
    run_experts(cfg, workers=0, progress=False)
    assert "expert 0 ended at chance accuracy" in caplog.text
    assert any(r.levelname == "WARNING" for r in caplog.records)


# --------------------------------------------------------------------------------------------
# 4. Damaged experts are an error naming the file, or retrained; never skipped
# --------------------------------------------------------------------------------------------


def test_truncated_expert_is_an_error_naming_the_file(prepared, tmp_path, capsys):
    cfg = fresh(prepared, tmp_path)
    path = tmp_path / "experts" / "expert_0000.pt"
    path.write_bytes(path.read_bytes()[:1000])
    conf = config_file(cfg, tmp_path / "c.yaml")
    for command in ("distill", "scores"):
        rc, err = run_cli(capsys, command, "--config", conf)
        assert rc == 2, command
        assert "expert_0000.pt: size 1000 bytes" in err and "selmatch experts" in err
    assert not storage.exists(f"{tmp_path}/synset/selmatch.pt")


def test_same_size_corruption_is_caught_and_retrained(prepared, tmp_path, capsys, caplog):
    cfg = fresh(prepared, tmp_path)
    path = tmp_path / "experts" / "expert_0001.pt"
    good = path.read_bytes()
    path.write_bytes(good[:-64] + bytes(64))  # same size, other bytes
    conf = config_file(cfg, tmp_path / "c.yaml")
    rc, err = run_cli(capsys, "distill", "--config", conf)
    assert rc == 2 and "expert_0001.pt: sha256 differs" in err
    caplog.set_level("WARNING")
    rc, _ = run_cli(capsys, "experts", "--workers", "0", "--config", conf)
    assert rc == 0 and "expert_0001.pt: sha256 differs" in caplog.text
    retrained = ExpertStore(cfg).load(1)  # verified against the manifest's new record
    original = torch.load(io.BytesIO(good), weights_only=False)
    assert torch.equal(retrained.trajectory, original["trajectory"])  # deterministic experts
    assert run_cli(capsys, "distill", "--config", conf)[0] == 0


# --------------------------------------------------------------------------------------------
# 5. A refused --resume writes nothing
# --------------------------------------------------------------------------------------------


def test_refused_resume_leaves_every_file_as_it_was(prepared, tmp_path, capsys):
    cfg = fresh(prepared, tmp_path, distill={"iterations": 2})
    conf = config_file(cfg, tmp_path / "c.yaml")
    assert run_cli(capsys, "distill", "--config", conf)[0] == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "c.yaml"}
    rc, err = run_cli(capsys, "distill", "--config", conf, "--distill.alpha", "0.75", "--resume")
    assert rc == 2 and "other settings" in err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "c.yaml"}
    assert after.keys() == before.keys()
    changed = [str(p) for p in before if before[p] != after[p]]
    assert changed == []


def test_resume_past_the_requested_iterations_is_refused(prepared, tmp_path, capsys):
    cfg = fresh(prepared, tmp_path, distill={"iterations": 4, "checkpoint_every": 2})
    conf = config_file(cfg, tmp_path / "c.yaml")
    assert run_cli(capsys, "distill", "--config", conf)[0] == 0
    rc, err = run_cli(capsys, "distill", "--config", conf, "--distill.iterations", "2", "--resume")
    assert rc == 2
    assert "is at iteration 4, past distill.iterations = 2" in err and "without --resume" in err


# --------------------------------------------------------------------------------------------
# 7. Messages, not tracebacks, naming the field or the file
# --------------------------------------------------------------------------------------------

QUICK = "configs/quickstart.yaml"


def test_directory_as_config(capsys):
    rc, err = run_cli(capsys, "config", "show", "--config", "configs")
    assert rc == 2 and "--config configs is a directory" in err


def test_download_without_network(tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    rc, err = run_cli(capsys, "experts", "--workers", "0", "--config", QUICK,
                      "--run_dir", str(tmp_path / "r"),
                      "--data.name", "cifar10", "--data.root", str(tmp_path / "data"),
                      "--data.download", "true", "--select.ipc", "10")
    assert rc == 2
    assert "cifar10: data.download could not fetch the files" in err and "data.root" in err


def test_run_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    rc, err = run_cli(capsys, "experts", "--workers", "0", "--config", QUICK,
                      "--run_dir", str(target))
    assert rc == 2 and f"run_dir {target} is a file, not a directory" in err


def test_read_only_run_dir(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through chmod; /sys refuses even root
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no read-only location for root on this system")
        run_dir = "/sys/kernel/selmatch-test-run"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        run_dir = str(ro / "run")
    rc, err = run_cli(capsys, "run", "--workers", "0", "--config", QUICK, "--run_dir", run_dir)
    assert rc == 2 and f"run_dir {run_dir} is not writable" in err


def test_negative_seed_is_a_config_error_before_any_work(capsys, monkeypatch):
    import distill.data

    monkeypatch.setattr(distill.data, "load_configured",
                        lambda *a, **k: pytest.fail("data loaded before validation"))
    rc, err = run_cli(capsys, "experts", "--workers", "0", "--config", QUICK, "--seed", "-1")
    assert rc == 2 and "seed must be in [0, inf], got -1" in err


def test_scores_file_of_random_bytes_names_the_file(tmp_path, capsys):
    bad = tmp_path / "f.npy"
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    rc, err = run_cli(capsys, "scores", "--config", QUICK, "--run_dir", str(tmp_path / "r"),
                      "--scores.file", str(bad))
    assert rc == 2 and f"scores.file {bad} is not a readable .npy/.npz array file" in err


@pytest.mark.parametrize("where", ["imported", "run_dir"])
def test_nan_inside_a_scores_file_names_the_file(prepared, tmp_path, capsys, where):
    cfg = fresh(prepared, tmp_path)
    values = np.load(tmp_path / "scores" / "forgetting.npy")
    values[[3, 7]] = np.nan
    if where == "imported":
        np.save(tmp_path / "f.npy", values)
        args = ["scores", "--scores.file", str(tmp_path / "f.npy")]
        name = str(tmp_path / "f.npy")
    else:  # written with its checksum: NaN scores that reached the run directory intact
        import io

        from distill import integrity

        buf = io.BytesIO()
        np.save(buf, values)
        integrity.write_bytes(f"{tmp_path}/scores/forgetting.npy", buf.getvalue())
        args = ["distill"]
        name = f"{tmp_path}/scores/forgetting.npy"
    rc, err = run_cli(capsys, args[0], "--config", config_file(cfg, tmp_path / "c.yaml"), *args[1:])
    assert rc == 2 and f"{name} contains 2 NaN or infinite score(s)" in err
    assert "[3, 7]" in err


def test_synset_file_without_its_keys_names_file_and_keys(prepared, tmp_path, capsys):
    cfg = fresh(prepared, tmp_path, eval={"model": "convnet", "runs": 1, "epochs": 1})
    from distill import integrity

    integrity.torch_save(f"{tmp_path}/synset/random.pt", {"labels": torch.zeros(3)})
    rc, err = run_cli(capsys, "evaluate", "--config", config_file(cfg, tmp_path / "c.yaml"))
    assert rc == 2
    assert (f"{tmp_path}/synset/random.pt is damaged (missing key(s) images, is_distilled, "
            f"source_index, syn_lr); re-create it with `selmatch run`") in err


# --------------------------------------------------------------------------------------------
# 8. The matching step's thread count is fixed by the config, not by the launcher
# --------------------------------------------------------------------------------------------


def test_distilled_set_does_not_depend_on_the_launchers_thread_count(prepared, tmp_path):
    old = torch.get_num_threads()
    got = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)  # what accelerate (1) and plain python (all cores) leave
            cfg = fresh(prepared, tmp_path / f"t{n}", distill={"iterations": 3})
            got[n] = run_distill(cfg, progress=False).images().detach()
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got[1], got[2])
