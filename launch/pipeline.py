"""``selmatch run``: the whole pipeline, skipping every stage whose artifact exists and matches.

    selmatch run --config configs/quickstart.yaml          # digits, 2 CPU cores, a few minutes
    selmatch run --config configs/fmnist_ipc300.yaml --workers 4

experts → scores → window search (grid over β, validation split) → SelMatch distillation → MTT
distillation → baselines (random, top-k, oracle window) → evaluation of every method → report.
Each stage records what produced it (a config hash) next to its artifact; re-running after a crash
or a config change redoes only what is missing or stale.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys

import torch

from distill import storage
from distill.baselines import baseline_set, window_search
from distill.config import RunConfig, config_hash, dump_yaml, save_config
from distill.data import Dataset, load_configured
from distill.distiller import resume_hash
from distill.estimate import log_summary
from distill.evaluate import Reference
from distill.experts import expert_network
from distill.main import run_distill
from distill.metrics import log_eval, run_metrics
from distill.report import write_report
from distill.scores import load_scores, scores_exist
from distill.synset import load_synset
from distill.trajectories import ExpertStore
from launch.evaluate import ImageSet, evaluate_sets
from launch.experts import run_experts
from launch.scores import run_scores

log = logging.getLogger(__name__)

BASELINES = ("random", "topk", "window")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def mtt_config(cfg: RunConfig) -> RunConfig:
    """MTT is SelMatch with random initialisation and α = 1."""
    return dataclasses.replace(cfg, select=dataclasses.replace(cfg.select, init="random"),
                               distill=dataclasses.replace(cfg.distill, alpha=1.0))


def _stage_scores(cfg: RunConfig) -> None:
    url = storage.join(cfg.run_dir, "scores", f"{cfg.scores.kind}.json")
    want = config_hash(cfg, "data", "model", "experts", "scores", "seed")
    if scores_exist(cfg.run_dir, cfg.scores.kind) and storage.read_json(url).get("hash") == want:
        log.info("scores: %s present, skipped", cfg.scores.kind)
        return
    run_scores(cfg)
    meta = storage.read_json(url)
    storage.write_json(url, {**meta, "hash": want})


def _stage_window(cfg: RunConfig, ds: Dataset) -> dict:
    url = storage.join(cfg.run_dir, "window", "results.json")
    want = config_hash(cfg, "data", "model", "experts", "scores", "eval", "tune", "seed") + \
        f"-ipc{cfg.select.ipc}"
    if storage.exists(url) and storage.read_json(url).get("hash") == want:
        log.info("window search: present, skipped")
        return storage.read_json(url)
    result = window_search(cfg, ds, load_scores(cfg.run_dir, cfg.scores.kind), device=_device())
    result["hash"] = want
    storage.write_json(url, result)
    log.info("window search: best beta %.3g (validation accuracy %s)", result["best_beta"],
             ", ".join(f"{a:.3f}" for a in result["val_accuracy"]))
    return result


def _stage_distill(cfg: RunConfig, method: str) -> None:
    url = storage.join(cfg.run_dir, "synset", f"{method}.pt")
    if storage.exists(url) and storage.torch_load(url)["meta"].get("hash") == resume_hash(cfg):
        log.info("distill %s: present, skipped", method)
        return
    ckpt = storage.join(cfg.run_dir, "checkpoints", f"{method}.pt")
    if storage.exists(ckpt) and storage.torch_load(ckpt).get("resume_hash") != resume_hash(cfg):
        log.info("distill %s: checkpoint from other settings, starting over", method)
        storage.remove(ckpt)
    run_distill(cfg, resume=True)


def _stage_baselines(cfg: RunConfig, ds: Dataset, best_beta: float) -> None:
    scores = load_scores(cfg.run_dir, cfg.scores.kind)
    for method in BASELINES:
        beta = best_beta if method == "window" else None
        synset = baseline_set(method, cfg, ds, scores, beta)
        meta = {"method": method, "ipc": cfg.select.ipc, "beta": beta, "seed": cfg.seed}
        synset.save(cfg.run_dir, method, meta=meta, denormalize=ds.denormalize)


def _reference(cfg: RunConfig, ds: Dataset) -> Reference:
    store = ExpertStore(cfg)
    expert = store.load(store.finished_ids()[0])
    return Reference.from_expert(expert_network(cfg, ds, expert, device=_device()), ds)


def _stage_evaluate(cfg: RunConfig, ds: Dataset, methods: list[str], *,
                    workers: int | None = None, ray_address: str | None = None) -> None:
    """Evaluate every method whose result is missing or stale; their runs go out together
    (Ray tasks, or in-process with ``workers=0``: launch/evaluate.py)."""
    stale = {}
    for method in methods:
        synset_url = storage.join(cfg.run_dir, "synset", f"{method}.pt")
        out = storage.join(cfg.run_dir, "eval", f"{method}.json")
        fingerprint = storage.sha256(synset_url) + config_hash(cfg, "eval", "seed")
        if storage.exists(out) and storage.read_json(out).get("fingerprint") == fingerprint:
            log.info("evaluate %s: present, skipped", method)
            continue
        synset, _ = load_synset(cfg.run_dir, method)
        stale[method] = (ImageSet(synset.images().detach(), synset.labels, synset.is_distilled),
                         fingerprint, out)
    if not stale:
        return
    results = evaluate_sets(cfg, ds, {m: v[0] for m, v in stale.items()},
                            reference=_reference(cfg, ds), workers=workers,
                            ray_address=ray_address)
    metrics = run_metrics(cfg, "eval", keep=True)
    for method, res in results.items():
        images, fingerprint, out = stale[method]
        record = {**res.to_dict(), "method": method, "fingerprint": fingerprint,
                  "n_distilled": int(images.is_distilled.sum())}
        storage.write_json(out, record)
        log_eval(metrics, method, res)
        log.info("evaluate %s: %.2f ± %.2f %% over %d runs", method, 100 * res.mean,
                 100 * res.std, res.runs)
    metrics.close()


def run_pipeline(cfg: RunConfig, *, workers: int | None = None, ray_address: str | None = None,
                 command: str | None = None) -> str:
    """Run every stage; returns the report URL."""
    save_config(cfg)
    run_experts(cfg, workers=workers, ray_address=ray_address)
    _stage_scores(cfg)
    ds = load_configured(cfg.data)
    window = _stage_window(cfg, ds)
    _stage_distill(cfg, "selmatch")
    _stage_distill(mtt_config(cfg), "mtt")
    _stage_baselines(cfg, ds, window["best_beta"])
    _stage_evaluate(cfg, ds, [*BASELINES, "mtt", "selmatch"], workers=workers,
                    ray_address=ray_address)
    save_config(cfg)
    notes = [f"Dataset {cfg.data.name}, IPC {cfg.select.ipc} "
             f"({cfg.select.ipc * ds.info.num_classes} images, "
             f"{100 * cfg.select.ipc * ds.info.num_classes / len(ds.y_train):.1f}% of "
             f"{len(ds.y_train)}), SelMatch α = {cfg.distill.alpha:g}, β = {cfg.select.beta:g}, "
             f"{cfg.distill.iterations} distillation iterations, "
             f"{len(ExpertStore(cfg).finished_ids())} experts × {cfg.experts.epochs} epochs, "
             f"device {_device()}."]
    url = write_report(cfg.run_dir, title=f"selmatch report: {cfg.data.name}, IPC {cfg.select.ipc}",
                       config_text=dump_yaml(cfg), notes=notes, command=command)
    log.info("report: %s", url)
    return url


def cmd_window(args, overrides: list[str]) -> int:
    """``selmatch window``: the β grid search and the oracle-window set at the best β."""
    from launch.cli import resolve_config

    cfg = resolve_config(args, overrides)
    save_config(cfg)
    ds = load_configured(cfg.data)
    window = _stage_window(cfg, ds)
    synset = baseline_set("window", cfg, ds, load_scores(cfg.run_dir, cfg.scores.kind),
                          window["best_beta"])
    synset.save(cfg.run_dir, "window", meta={"method": "window", "ipc": cfg.select.ipc,
                                             "beta": window["best_beta"], "seed": cfg.seed},
                denormalize=ds.denormalize)
    print(storage.join(cfg.run_dir, "window", "results.json"))
    return 0


def cmd_evaluate(args, overrides: list[str]) -> int:
    """``selmatch evaluate``: evaluate every synthetic set present in ``synset/``."""
    from launch.cli import resolve_config

    cfg = resolve_config(args, overrides)
    methods = [m for m in (*BASELINES, "mtt", "selmatch", "merge")
               if storage.exists(storage.join(cfg.run_dir, "synset", f"{m}.pt"))]
    if not methods:
        raise FileNotFoundError(f"no synthetic sets in {storage.join(cfg.run_dir, 'synset')}; "
                                f"create them with `selmatch distill` or `selmatch run`")
    save_config(cfg)
    _stage_evaluate(cfg, load_configured(cfg.data), methods, workers=args.workers,
                    ray_address=args.ray_address)
    for m in methods:
        print(storage.join(cfg.run_dir, "eval", f"{m}.json"))
    return 0


def cmd_run(args, overrides: list[str]) -> int:
    from launch.cli import resolve_config

    cfg = resolve_config(args, overrides)
    log_summary(cfg, ranks=1, device=_device())
    command = "selmatch " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(run_pipeline(cfg, workers=args.workers, ray_address=args.ray_address, command=command))
    return 0
