"""``selmatch run``: the whole pipeline, skipping every stage whose artifact is fresh.

    selmatch run --config configs/quickstart.yaml          # digits, 2 CPU cores, ~10 minutes
    selmatch run --config configs/fmnist_ipc300.yaml --workers 4 --seeds 0 1 2

experts → scores (and the top-k row's forgetting scores) → window search (grid over β, validation
split) → for each repetition seed: the selection rows' sets, the distillations the chosen rows
need (SelMatch, MTT, selection init + full update), the evaluation of every row with its
augmentation (distill/methods.py) → report pooling seeds × evaluation runs.

Freshness is one rule for every stage (distill/freshness.py, launch/stages.py): re-running after a
crash or a config change redoes exactly what is missing or stale, and a longer distillation
continues from its checkpoint.
"""

from __future__ import annotations

import logging
import shlex
import sys

from distill import integrity, storage
from distill.lock import run_dir_lock
from distill.config import RunConfig
from distill.config_io import dump_yaml, load_config, repetitions, save_config
from distill.data import load_configured
from distill.preflight import log_summary
from distill.runtime import device_for
from distill.data import flip_invariant
from distill.methods import DISTILLED, METHODS, chosen, eval_network, flip_for, synsets_needed
from distill.prerequisites import require_stages
from distill.report import write_report
from distill.scores import load_scores
from distill.trajectories import ExpertStore
from launch.experts import at_chance, run_experts
from launch.scores import ensure_scores, topk_config
from launch.stages import (
    ReferenceCache,
    require_fresh_sets,
    stage_distill,
    stage_evaluate,
    stage_selection,
    stage_window,
)

log = logging.getLogger(__name__)


def _notes(cfg: RunConfig, ds, window: dict | None) -> list[str]:
    store = ExpertStore(cfg)
    manifest = store.manifest()
    n_syn = cfg.select.ipc * ds.info.num_classes
    seeds = cfg.seeds or [cfg.seed]
    notes = [f"Dataset {cfg.data.name}, IPC {cfg.select.ipc} ({n_syn} images, "
             f"{100 * n_syn / len(ds.y_train):.1f}% of {len(ds.y_train)}), SelMatch α = "
             f"{cfg.distill.alpha:g}, β = {cfg.select.beta:g}, {cfg.distill.iterations} "
             f"distillation iterations per distilled set, {cfg.experts.num_experts} experts × "
             f"{cfg.experts.epochs} epochs (shared by every row and seed), repetition seeds "
             f"{', '.join(map(str, seeds))}, device {device_for()}."]
    net = eval_network(cfg)
    arch = (f"ConvNet width {net['width']}, depth {net['depth'] or 'default'}, {net['norm']} norm"
            if cfg.eval.model == "convnet" else f"{cfg.eval.model}, {net['norm']} norm")
    notes.append(f"Evaluation network: {arch}; crop + flip of real rows "
                 f"{'flips' if flip_for(cfg) else 'does not flip'} ({cfg.data.name} is "
                 f"{'' if flip_invariant(cfg.data.name) else 'not '}flip-invariant"
                 f"{'; eval.flip overrides' if cfg.eval.flip is not None else ''}), "
                 f"{cfg.eval.crop_fill} crop fill.")
    if window is not None:
        notes.append(f"Best window (validation β): β = {window['best_beta']:g} from the window "
                     f"search ({window.get('augment', '?')} augmentation, "
                     f"{window['validation_size']} validation images held out of every "
                     f"candidate's pool).")
    for key, entry in sorted(manifest["experts"].items(), key=lambda kv: int(kv[0])):
        if int(key) < cfg.experts.num_experts and at_chance(entry):
            notes.append(f"**WARNING: expert {key} ended at chance accuracy** "
                         f"({100 * entry['test_acc'][-1]:.1f}%, chance {100 * entry['chance']:.1f}%): "
                         f"trajectories and scores made from it are noise.")
    return notes


def run_pipeline(cfg: RunConfig, *, workers: int | None = None, ray_address: str | None = None,
                 command: str | None = None) -> str:
    """Run every stage (holding the run directory's lock); returns the report URL."""
    storage.check_writable(cfg.run_dir)
    with run_dir_lock(cfg.run_dir, command or "selmatch run"):
        return _run_pipeline(cfg, workers=workers, ray_address=ray_address, command=command)


def _run_pipeline(cfg: RunConfig, *, workers: int | None, ray_address: str | None,
                  command: str | None) -> str:
    ds = load_configured(cfg.data)
    run_experts(cfg, workers=workers, ray_address=ray_address)  # checks its manifest first
    ensure_scores(cfg)
    rows = chosen(cfg)
    if "topk" in rows:
        ensure_scores(topk_config(cfg))
    window = stage_window(cfg, ds) if "window" in rows else None
    reference = ReferenceCache(cfg, ds)
    for rep in repetitions(cfg):
        for name in rows:
            if METHODS[name].made_by == "selection" and METHODS[name].synset == name:
                stage_selection(rep, cfg, name, ds, window["best_beta"] if window else None)
        for synset in synsets_needed(cfg):
            if synset in DISTILLED:
                stage_distill(rep, cfg, synset)
    stage_evaluate([(rep, name) for rep in repetitions(cfg) for name in rows], cfg, ds, reference,
                   workers=workers, ray_address=ray_address)
    save_config(cfg)
    url = write_report(cfg, title=f"selmatch report: {cfg.data.name}, IPC {cfg.select.ipc}",
                       config_text=dump_yaml(cfg), notes=_notes(cfg, ds, window), command=command)
    log.info("report: %s", url)
    return url


def cmd_window(args, overrides: list[str]) -> int:
    """``selmatch window``: the β grid search and the best-window set at the chosen β."""
    cfg = load_config(args.config, overrides)
    require_stages(cfg, "window")
    storage.check_writable(cfg.run_dir)
    ds = load_configured(cfg.data)
    load_scores(cfg.run_dir, cfg.scores.kind)  # checked before anything is written
    with run_dir_lock(cfg.run_dir, "selmatch window"):
        save_config(cfg)
        window = stage_window(cfg, ds)
        stage_selection(cfg, cfg, "window", ds, window["best_beta"])
    print(storage.join(cfg.run_dir, "window", "results.json"))
    return 0


def _window_beta(cfg: RunConfig) -> float | None:
    """The β the window search chose (verified results), or None without a search."""
    url = storage.join(cfg.run_dir, "window", "results.json")
    if not storage.exists(url):
        return None
    return integrity.read_json(url, fix="run `selmatch window --config F` again")["best_beta"]


def cmd_evaluate(args, overrides: list[str]) -> int:
    """``selmatch evaluate``: evaluate every chosen row whose set is present in ``synset/``."""
    cfg = load_config(args.config, overrides)
    require_stages(cfg, "evaluate")
    names = [m for m in chosen(cfg) if storage.exists(
        storage.join(cfg.run_dir, "synset", f"{METHODS[m].synset}.pt"))]
    if not names:
        raise FileNotFoundError(f"no synthetic sets in {storage.join(cfg.run_dir, 'synset')}; "
                                f"create them with `selmatch distill` or `selmatch run`")
    storage.check_writable(cfg.run_dir)
    # the freshness rule of `selmatch run`: only sets this config would make are evaluated
    require_fresh_sets(cfg, list(dict.fromkeys(METHODS[m].synset for m in names)),
                       _window_beta(cfg))
    ds = load_configured(cfg.data)
    with run_dir_lock(cfg.run_dir, "selmatch evaluate"):
        save_config(cfg)
        stage_evaluate([(cfg, name) for name in names], cfg, ds, ReferenceCache(cfg, ds),
                       workers=args.workers, ray_address=args.ray_address)
    for name in names:
        print(storage.join(cfg.run_dir, "eval", f"{name}.json"))
    return 0


def cmd_run(args, overrides: list[str]) -> int:
    if args.seeds:
        overrides = [*overrides, f"--seeds=[{', '.join(map(str, args.seeds))}]"]
    cfg = load_config(args.config, overrides)
    log_summary(cfg, ranks=1, device=device_for())
    command = "selmatch " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(run_pipeline(cfg, workers=args.workers, ray_address=args.ray_address, command=command))
    return 0
