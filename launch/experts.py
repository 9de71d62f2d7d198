"""``selmatch experts``: train expert trajectories in parallel, one Ray task per expert.

    selmatch experts --config configs/quickstart.yaml                 # local Ray (ray.init())
    selmatch experts --config configs/quickstart.yaml --workers 0     # in-process, no Ray
    selmatch experts --config configs/quickstart.yaml --workers 2     # at most 2 tasks at once
    selmatch experts --config configs/cifar10_ipc250.yaml --ray-address auto   # join a cluster

Each task requests ``experts.num_cpus`` CPUs and ``experts.num_gpus`` GPUs (fractions share a
GPU). Experts already recorded in ``<run_dir>/experts/manifest.json`` are skipped, so an
interrupted job resumes by running the same command again. The dataset is put in Ray's object
store once and shared by all tasks. Results are recorded by this driver process as they finish.
"""

from __future__ import annotations

import logging
import os

import torch
from tqdm.auto import tqdm

from distill import storage
from distill.config import RunConfig
from distill.config_io import load_config, save_config
from distill.data import Dataset, load_configured
from distill.experts import train_expert
from distill.lock import run_dir_lock
from distill.runtime import device_for
from distill.search import at_chance
from distill.trajectories import ExpertStore

log = logging.getLogger(__name__)


def chance_level(ds: Dataset) -> float:
    """Accuracy of always predicting the test set's most frequent class."""
    counts = torch.bincount(ds.y_test, minlength=ds.info.num_classes)
    return float(counts.max()) / max(1, len(ds.y_test))


def expert_at_chance(entry: dict) -> bool:
    """An expert whose final test accuracy is at chance (distill/search.py ``at_chance``): it
    learned (next to) nothing, and trajectories or scores made from it would be noise."""
    chance = entry.get("chance")
    if chance is None or not entry.get("test_acc"):
        return False
    return at_chance(entry["test_acc"][-1], chance, entry.get("n_test"))


def train_and_save(cfg: RunConfig, ds: Dataset, expert_id: int, progress: bool = False) -> dict:
    """Train one expert and write its file; returns the manifest entry (runs on a worker)."""
    result = train_expert(cfg, ds, expert_id, device=device_for(cfg.experts.num_gpus),
                          progress=progress)
    return {**ExpertStore(cfg).save(result), "chance": round(chance_level(ds), 6),
            "n_test": len(ds.y_test)}


def warn_at_chance(manifest: dict, store_dir: str) -> list[str]:
    """Log a WARNING per expert that ended at chance accuracy; returns the messages."""
    out = []
    for key, entry in sorted(manifest["experts"].items(), key=lambda kv: int(kv[0])):
        if expert_at_chance(entry):
            msg = (f"expert {key} ended at chance accuracy: test accuracy "
                   f"{100 * entry['test_acc'][-1]:.1f}% vs {100 * entry['chance']:.1f}% for always "
                   f"guessing the largest class ({store_dir}). It learned nothing: check "
                   f"experts.lr, experts.epochs and the data; its trajectory and scores are noise")
            log.warning(msg)
            out.append(msg)
    return out


def train_on_ray(cfg: RunConfig, ds: Dataset, expert_id: int) -> dict:
    """``train_and_save`` as a Ray task; the manifest entry also names the node it ran on."""
    import ray

    return {**train_and_save(cfg, ds, expert_id), "node": ray.get_runtime_context().get_node_id()}


def run_experts(cfg: RunConfig, *, workers: int | None = None, ray_address: str | None = None,
                progress: bool = True) -> dict:
    """Train every missing expert; returns the manifest. ``workers=0`` trains without Ray."""
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if workers != 0 and cfg.run_dir.startswith("memory://"):
        raise ValueError(f"run_dir {cfg.run_dir} lives in this process's memory, which Ray "
                         f"workers cannot write: use --workers 0, or a run_dir on storage every "
                         f"worker reaches (a shared filesystem or an object store)")
    storage.check_writable(cfg.run_dir)
    with run_dir_lock(cfg.run_dir, "selmatch experts"):
        return _run_experts(cfg, workers=workers, ray_address=ray_address, progress=progress)


def _run_experts(cfg: RunConfig, *, workers: int | None, ray_address: str | None,
                 progress: bool) -> dict:
    store = ExpertStore(cfg)
    manifest = store.repair_or_manifest()  # settings checked before anything is written
    for i in store.wanted_ids():  # more than sizes: every recorded file's sha256
        problem = store.problem(i, deep=True, manifest=manifest) if str(i) in manifest["experts"] \
            else None
        if problem is not None:
            log.warning("%s: retraining expert %d", problem, i)
    missing = store.missing_ids(deep=True)
    done = cfg.experts.num_experts - len(missing)
    save_config(cfg)
    if not missing:
        log.info("all %d experts present and intact (size and sha256) in %s; nothing to do",
                 cfg.experts.num_experts, store.dir)
        warn_at_chance(manifest, store.dir)
        return manifest
    log.info("%d of %d experts present; training %d (%s)", done, cfg.experts.num_experts,
             len(missing), "in-process" if workers == 0 else "Ray")
    ds = load_configured(cfg.data)
    storage.write_json(storage.join(cfg.run_dir, "data.json"), ds.describe())
    bar = tqdm(total=len(missing), desc="experts", disable=not progress)
    if workers == 0:
        for expert_id in missing:
            entry = train_and_save(cfg, ds, expert_id, progress=progress)
            store.record(entry)
            _report(bar, entry)
    else:
        _run_on_ray(cfg, ds, missing, store, bar, workers=workers, address=ray_address)
    bar.close()
    manifest = store.manifest()
    warn_at_chance(manifest, store.dir)
    return manifest


def _report(bar: tqdm, entry: dict) -> None:
    bar.update(1)
    acc = entry["test_acc"][-1] if entry["test_acc"] else float("nan")
    bar.set_postfix(last=entry["id"], test_acc=f"{acc:.3f}")
    log.debug("expert %d: test acc %.4f, %.1f s", entry["id"], acc, entry["seconds"])


def _run_on_ray(cfg: RunConfig, ds: Dataset, missing: list[int], store: ExpertStore, bar: tqdm,
                *, workers: int | None, address: str | None) -> None:
    import ray

    from launch.ray_utils import init_ray, run_limited

    started = init_ray(address)
    try:
        task = ray.remote(num_cpus=cfg.experts.num_cpus, num_gpus=cfg.experts.num_gpus,
                          max_retries=1)(train_on_ray)
        ds_ref = ray.put(ds)

        def done(_, entry: dict) -> None:
            store.record(entry)
            _report(bar, entry)

        run_limited(task, [(cfg, ds_ref, i) for i in missing], done, limit=workers)
    finally:
        if started:
            ray.shutdown()


def cmd_experts(args, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides)
    manifest = run_experts(cfg, workers=args.workers, ray_address=args.ray_address)
    accs = [manifest["experts"][str(i)]["test_acc"][-1] for i in range(cfg.experts.num_experts)
            if manifest["experts"][str(i)]["test_acc"]]
    if accs:
        log.info("%d experts in %s; final test accuracy %.4f (min %.4f, max %.4f)", len(accs),
                 os.path.join(cfg.run_dir, "experts"), sum(accs) / len(accs), min(accs), max(accs))
    return 0
