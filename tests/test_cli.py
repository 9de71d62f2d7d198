"""The selmatch command line: resolved config, clear errors with non-zero exit, data list, stages."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from distill import storage
from distill.config import ConfigError
from distill.runtime import DivergedRanksError
from launch.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quickstart.yaml")


def test_config_show_applies_overrides(capsys):
    assert main(["config", "show", "--config", QUICK, "--distill.alpha", "0.3",
                 "--run_dir=/tmp/x"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["distill"]["alpha"] == 0.3
    assert shown["run_dir"] == "/tmp/x"
    assert shown["data"]["name"] == "digits"


def test_bad_override_exits_2_naming_field(capsys):
    assert main(["config", "show", "--config", QUICK, "--distill.alpha", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "distill.alpha must be in [0, 1], got 1.5" in err


def test_unknown_override_field(capsys):
    assert main(["config", "show", "--config", QUICK, "--distill.alfa", "0.3"]) == 2
    assert "distill.alfa: unknown field" in capsys.readouterr().err


def test_data_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows["digits"] == "yes" and rows["synthetic"] == "yes"
    assert set(rows) == {"digits", "synthetic", "fashion_mnist", "mnist", "cifar10", "cifar100",
                         "tinyimagenet", "imagefolder"}
    assert rows["imagefolder"] == "no"  # no data.root given: its facts are its files
    if os.path.isdir("/usr/share/datasets/fashion-mnist"):
        assert rows["fashion_mnist"] == "yes"


def test_console_script_help_and_exit_code():
    exe = os.path.join(os.path.dirname(sys.executable), "selmatch")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "experts" in out.stdout and "config" in out.stdout
    bad = subprocess.run([exe, "config", "show", "--config", QUICK, "--select.ipc", "100000"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "select.ipc" in bad.stderr


def test_experts_and_scores_commands_in_process(capsys):
    run_dir = "memory://cli-test/run"
    common = ["--config", QUICK, "--run_dir", run_dir, "--data.train_per_class", "20",
              "--model.width", "8", "--experts.num_experts", "2", "--experts.epochs", "2",
              "--distill.max_start_epoch", "1", "--distill.expert_epochs", "1"]
    assert main(["experts", "--workers", "0", *common]) == 0
    manifest = storage.read_json(f"{run_dir}/experts/manifest.json")
    assert sorted(manifest["experts"]) == ["0", "1"]
    assert main(["scores", *common]) == 0
    assert main(["scores", *common, "--scores.kind", "el2n"]) == 0
    forget = storage.read_bytes(f"{run_dir}/scores/forgetting.npy")
    assert len(forget) > 200 * 8  # 200 float64 values plus the .npy header
    assert storage.read_json(f"{run_dir}/scores/el2n.json")["hard_end"] == "high"
    assert yaml.safe_load(storage.read_text(f"{run_dir}/config.yaml"))["scores"]["kind"] == "el2n"


def test_scores_before_experts_says_what_to_run(capsys, tmp_path):
    assert main(["scores", "--config", QUICK, "--run_dir", str(tmp_path)]) == 2
    assert "selmatch experts" in capsys.readouterr().err


def test_import_scores_command(tmp_path, capsys):
    n = 300  # digits, 30 per class
    np.save(tmp_path / "f.npy", np.arange(n, dtype=np.float32))
    args = ["scores", "--config", QUICK, "--run_dir", str(tmp_path / "r"),
            "--data.train_per_class", "30", "--scores.file", str(tmp_path / "f.npy")]
    assert main(args) == 0
    np.save(tmp_path / "f.npy", np.arange(n + 1, dtype=np.float32))
    assert main(args) == 2
    assert "301 scores" in capsys.readouterr().err


def test_window_and_evaluate_commands(tmp_path, capsys):
    from distill.config_io import dump_yaml
    from tiny import prepare, tiny_config

    cfg = prepare(tiny_config(tmp_path, eval={"model": "convnet", "runs": 1, "epochs": 2,
                                              "batch_size": 32},
                              tune={"beta_step": 0.5, "beta_epoch_fraction": 0.5}))
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    assert main(["window", "--config", str(path)]) == 0
    results = storage.read_json(f"{tmp_path}/window/results.json")
    assert results["betas"] == [0.0, 0.5] and results["best_beta"] in (0.0, 0.5)
    assert storage.exists(f"{tmp_path}/synset/window.pt")
    assert main(["evaluate", "--config", str(path), "--workers", "0"]) == 0
    record = storage.read_json(f"{tmp_path}/eval/window.json")
    assert record["runs"] == 1 and record["epochs"] == 2 and record["coverage"] is not None
    assert main(["evaluate", "--config", str(path), "--run_dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "missing earlier stages (1) of selmatch evaluate" in err and "- experts: missing" in err


def test_diverged_distillation_exits_1_with_message(tmp_path, capsys, monkeypatch):
    from distill.distiller import DivergenceError, Distiller

    def diverge(self, iteration):
        raise DivergenceError(f"matching loss or gradient is not finite at iteration {iteration}")

    monkeypatch.setattr(Distiller, "step", diverge)
    from distill.config_io import dump_yaml
    from tiny import prepare, tiny_config

    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(prepare(tiny_config(tmp_path))))
    assert main(["distill", "--config", str(path)]) == 1
    assert "not finite at iteration 0" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# One exit-code map (launch/exits.py) for selmatch, python -m tune and distill/main.py
# --------------------------------------------------------------------------------------------

EXITS = [
    (lambda: ConfigError(["distill.alpha must be in [0, 1], got 2"]), 2,
     "invalid configuration (1 problem(s)):\n  - distill.alpha must be in [0, 1], got 2"),
    (lambda: FileNotFoundError("no experts in R/experts"), 2, "error: no experts in R/experts"),
    (lambda: ValueError("R/experts/expert_0000.pt: checksum mismatch"), 2,
     "error: R/experts/expert_0000.pt: checksum mismatch"),
    (lambda: PermissionError("denied"), 2, "error: PermissionError: denied"),
    (lambda: FloatingPointError("diverged at iteration 3"), 1, "diverged at iteration 3"),
    (lambda: DivergedRanksError("rank 1: images differ"), 1, "rank 1: images differ"),
    (lambda: RuntimeError("the beta search stopped early"), 1,
     "error: the beta search stopped early"),
    (lambda: KeyboardInterrupt(), 130, "interrupted"),
]


def _entry_points():
    import launch.distillation as distill_entry  # what distill/main.py runs
    import tune.main as tune_main

    return [("selmatch tune", lambda: main(["tune", "--config", QUICK, "--no-ray"])),
            ("tune", lambda: tune_main.main(["--config", QUICK, "--no-ray"])),
            ("selmatch distill", lambda: main(["distill", "--config", QUICK])),
            ("distill", lambda: distill_entry.main(["--config", QUICK, "--cpu"]))]


@pytest.mark.parametrize("make,status,message", EXITS,
                         ids=[type(make()).__name__ for make, _, _ in EXITS])
def test_every_entry_point_maps_an_exception_the_same_way(make, status, message, monkeypatch,
                                                          capsys):
    """Once a RuntimeError exited 1 with a message under ``python -m tune`` and escaped as
    a traceback under ``selmatch tune``; distill/main.py had a third map. One map now."""
    import launch.distillation as distill_entry
    import tune.main as tune_main

    def fail(*args, **kwargs):
        raise make()

    monkeypatch.setattr(tune_main, "run_tune", fail)
    monkeypatch.setattr(distill_entry, "distill_set", fail)
    for prog, call in _entry_points():
        assert call() == status, prog
        assert f"{prog}: {message}" in capsys.readouterr().err, prog


def test_an_unmapped_exception_keeps_its_traceback(monkeypatch):
    import launch.distillation as distill_entry
    import tune.main as tune_main

    def fail(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(tune_main, "run_tune", fail)
    monkeypatch.setattr(distill_entry, "distill_set", fail)
    for prog, call in _entry_points():
        with pytest.raises(TypeError, match="a bug"):
            call()
