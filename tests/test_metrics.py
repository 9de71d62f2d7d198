"""Metrics sinks: TensorBoard event files read back (local and fsspec run directories), and the
distillation and evaluation scalars a run writes with ``metrics.tensorboard: true``."""

from __future__ import annotations

import importlib.util
import os
import uuid

import fsspec
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distill import storage
from distill.config import ConfigError
from distill.config_io import dump_yaml
from distill.metrics import JsonlSink, Metrics, TensorBoardSink, read_jsonl
from launch.cli import main


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_sink_round_trip(tmp_path):
    sink = TensorBoardSink(str(tmp_path / "tb"))
    m = Metrics([sink])
    m.log(step=1, loss=0.5, syn_lr=0.01, note="text is skipped", ok=True)
    m.log(step=2, loss=0.25, syn_lr=0.02, bad=float("nan"))
    m.close()
    got = scalars(tmp_path / "tb")
    assert set(got) == {"loss", "syn_lr"}
    assert got["loss"] == [(1, 0.5), (2, 0.25)]
    assert [s for s, _ in got["syn_lr"]] == [1, 2]
    assert got["syn_lr"][1][1] == pytest.approx(0.02)


def _names(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def test_tensorboard_sink_on_an_fsspec_url(tmp_path):
    url = f"memory://tb-{uuid.uuid4().hex}/run/tensorboard/x"
    sink = TensorBoardSink(url)
    sink.write({"step": 3, "loss": 1.5})
    sink.flush()
    names = _names(url)
    assert len(names) == 1 and "tfevents" in names[0]
    sink.write({"step": 4, "loss": 0.75})
    sink.close()
    local = tmp_path / "copy"
    local.mkdir()
    for name in _names(url):
        (local / name).write_bytes(storage.read_bytes(storage.join(url, name)))
    assert scalars(local)["loss"] == [(3, 1.5), (4, 0.75)]


def test_distill_and_evaluate_write_event_files(tmp_path, capsys):
    from launch.distillation import run_distill
    from tiny import prepare, tiny_config

    cfg = prepare(tiny_config(tmp_path, metrics={"tensorboard": True},
                              eval={"model": "convnet", "runs": 2, "epochs": 2,
                                    "batch_size": 32}))
    run_distill(cfg, progress=False)
    # distillation: loss, syn_lr, speed and memory at every logged step, as in the JSONL log
    logged = read_jsonl(f"{tmp_path}/logs/distill_selmatch.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    got = scalars(tmp_path / "tensorboard" / "distill_selmatch")
    for key in ("loss", "syn_lr", "image_steps_per_s", "peak_rss_mib"):
        assert [s for s, _ in got[key]] == [1, 2, 3, 4], key
        assert [v for _, v in got[key]] == pytest.approx([r[key] for r in logged], rel=1e-6)
    # evaluation: per-run and summary accuracies
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    assert main(["evaluate", "--config", str(path), "--workers", "0"]) == 0
    result = storage.read_json(f"{tmp_path}/eval/selmatch.json")
    ev = scalars(tmp_path / "tensorboard" / "eval")
    assert [v for _, v in ev["eval/selmatch/run_acc"]] == pytest.approx(result["accuracies"])
    assert ev["eval/selmatch/mean"] == [(0, pytest.approx(result["mean"]))]
    assert ev["eval/selmatch/coverage"][0][1] == pytest.approx(result["coverage"])
    assert any(r.get("eval/selmatch/mean") == result["mean"]
               for r in read_jsonl(f"{tmp_path}/logs/eval.jsonl"))


def test_resumed_distillation_shows_each_step_once(tmp_path):
    """Killed after logging step 5 with the checkpoint at 4, then resumed: the JSONL log and
    TensorBoard each hold steps 1..6 once, with the values of the resumed session.

    What a kill may lose (docs/running.md): metrics are flushed with every checkpoint, so steps
    up to the checkpoint are on storage; a step logged after it (5) may or may not be, as the
    TensorBoard writer flushes on its own schedule, and is logged again by the resumed run."""
    import torch

    from launch.distillation import run_distill
    from tiny import distill_killed_at, prepare, tiny_config

    cfg = prepare(tiny_config(tmp_path, metrics={"tensorboard": True},
                              distill={"iterations": 6, "checkpoint_every": 2, "log_every": 1}))
    distill_killed_at(cfg, 5)  # in the 6th iteration
    assert torch.load(f"{tmp_path}/checkpoints/selmatch.pt")["iteration"] == 4
    tb = tmp_path / "tensorboard" / "distill_selmatch"
    assert [s for s, _ in scalars(tb)["loss"]] in ([1, 2, 3, 4], [1, 2, 3, 4, 5])
    run_distill(cfg, resume=True, progress=False)
    logged = read_jsonl(f"{tmp_path}/logs/distill_selmatch.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    got = scalars(tb)["loss"]
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert len(list(tb.iterdir())) == 2  # one event file per session


def test_tensorboard_resume_after_must_come_first(tmp_path):
    sink = TensorBoardSink(str(tmp_path / "tb"))
    sink.write({"step": 1, "loss": 1.0})
    with pytest.raises(RuntimeError, match="before the first record"):
        sink.resume_after(0)
    sink.close()


def test_tensorboard_off_by_default_and_checked_when_on(tmp_path, monkeypatch):
    from tiny import tiny_config

    assert tiny_config(tmp_path).metrics.tensorboard is False
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="metrics.tensorboard is true but the tensorboard "
                                          "package is not installed"):
        tiny_config(tmp_path, metrics={"tensorboard": True})


def test_jsonl_kept_beside_tensorboard(tmp_path):
    m = Metrics([JsonlSink(str(tmp_path / "a.jsonl")), TensorBoardSink(str(tmp_path / "tb"))])
    m.log(step=1, loss=2.0)
    m.close()
    assert read_jsonl(str(tmp_path / "a.jsonl")) == [{"step": 1, "loss": 2.0}]
    assert os.listdir(tmp_path / "tb")


def test_every_seed_under_one_logdir_and_the_pooled_numbers_the_report_shows(tmp_path):
    """A repetition seed's curves live under the run's tensorboard/ (seed_<s>/...), and
    tensorboard/eval holds the pooled accuracies of results.json, once each however often the
    evaluation is redone."""
    import dataclasses
    import json

    from launch.pipeline import run_pipeline
    from tiny import prepare, tiny_config

    cfg = prepare(tiny_config(tmp_path, seed=2, metrics={"tensorboard": True},
                              eval={"model": "convnet", "runs": 2, "epochs": 2,
                                    "methods": ["random", "selmatch"]},
                              distill={"iterations": 2}))
    cfg = dataclasses.replace(cfg, seeds=[2, 3])
    run_pipeline(cfg, workers=0)
    assert (tmp_path / "tensorboard" / "distill_selmatch").is_dir()
    assert (tmp_path / "tensorboard" / "seed_3" / "distill_selmatch").is_dir()
    assert not (tmp_path / "seeds" / "3" / "tensorboard").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    run_pipeline(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, runs=1)),
                 workers=0)  # re-evaluated: the event files are rewritten, not appended to
    results = json.loads((tmp_path / "results.json").read_text())
    ev = scalars(tmp_path / "tensorboard" / "eval")
    for name, row in results["methods"].items():
        assert ev[f"eval/{name}/mean"] == [(0, pytest.approx(row["mean"]))]
        assert ev[f"eval/{name}/std"] == [(0, pytest.approx(row["std"]))]
        assert [v for _, v in ev[f"eval/{name}/run_acc"]] == pytest.approx(row["values"])
    logged = [r for r in read_jsonl(f"{tmp_path}/logs/eval.jsonl") if "eval/random/mean" in r]
    assert len(logged) == 1 and logged[0]["eval/random/mean"] == results["methods"]["random"]["mean"]
