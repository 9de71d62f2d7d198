"""``selmatch run``: the whole pipeline, making every artifact that is not fresh.

    selmatch run --config configs/quickstart.yaml          # digits, 2 CPU cores, ~10 minutes
    selmatch run --config configs/fmnist_ipc300.yaml --workers 4 --seeds 0 1 2
    selmatch run --config configs/fmnist_cpu.yaml --tuned  # at tune/selected.yaml's choice

It walks the stage table (distill/artifacts.py ``refs_of``: every artifact the chosen rows need,
upstream first): experts → scores (and the top-k row's) → window search (the best β and
SelMatch's start) → for each repetition seed the selection rows' sets and the distillations
the chosen rows need → the evaluation of every row → the report pooling seeds × evaluation
runs. Each artifact is made only when distill/freshness.py says it is missing or stale, so
re-running after a crash or a config change redoes exactly that, a longer distillation
continues from its checkpoint, and a run with nothing to do writes nothing.
"""

from __future__ import annotations

import logging
import shlex
import sys

from distill import storage
from distill.artifacts import Ref, digest, refs_of
from distill.config import RunConfig
from distill.config_io import dump_yaml, load_config, save_config
from distill.data import flip_invariant, load_configured
from distill.freshness import Freshness, MissingStagesError, present_sets, url_of
from distill.lock import check_not_busy, run_dir_lock
from distill.artifacts import set_of as set_ref
from distill.methods import chosen as chosen_rows
from distill.methods import eval_network, flip_for
from distill.preflight import log_summary
from distill.report import write_report
from distill.runtime import device_for
from distill.trajectories import ExpertStore
from launch.experts import run_experts, warn_at_chance
from launch.scores import ensure_scores
from launch.stages import (
    ReferenceCache,
    stage_distill,
    stage_evaluate,
    stage_selection,
    stage_window,
)

log = logging.getLogger(__name__)


def _notes(cfg: RunConfig, ds, check: Freshness) -> list[str]:
    manifest = ExpertStore(cfg).manifest()
    n_syn = cfg.select.ipc * ds.info.num_classes
    seeds = cfg.seeds or [cfg.seed]
    start = check.start(cfg.select.init, cfg.select.beta)
    notes = [f"Dataset {cfg.data.name}, IPC {cfg.select.ipc} ({n_syn} images, "
             f"{100 * n_syn / len(ds.y_train):.1f}% of {len(ds.y_train)}); SelMatch starts from "
             f"{start.describe()} with α = {cfg.distill.alpha:g} "
             f"({'tune' if cfg.tuned else 'config'}); {cfg.distill.iterations} distillation "
             f"iterations per distilled set, {cfg.experts.num_experts} experts × "
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
    window = check.window()
    if window is not None:
        notes.append(f"Window search: best window β = {window['best_beta']:g} "
                     f"({window.get('augment', '?')} augmentation, {window['validation_size']} "
                     f"validation images held out of every candidate's pool); "
                     f"{window['start']['why']}.")
    notes += [f"**WARNING: {w}**" for w in warn_at_chance(
        {"experts": {k: e for k, e in manifest["experts"].items()
                     if int(k) < cfg.experts.num_experts}}, ExpertStore(cfg).dir)]
    return notes


def run_pipeline(cfg: RunConfig, *, workers: int | None = None, ray_address: str | None = None,
                 command: str | None = None) -> str:
    """Make every artifact that is not fresh (holding the run directory's lock); returns the
    report URL."""
    storage.check_writable(cfg.run_dir)
    with run_dir_lock(cfg.run_dir, command or "selmatch run"):
        return _run_pipeline(cfg, workers=workers, ray_address=ray_address, command=command)


def _run_pipeline(cfg: RunConfig, *, workers: int | None, ray_address: str | None,
                  command: str | None) -> str:
    ds = load_configured(cfg.data)
    run_experts(cfg, workers=workers, ray_address=ray_address)  # checks its manifest first
    check = Freshness(cfg, ds)
    evaluations = []
    for ref in refs_of(cfg):
        if ref.kind == "scores":
            ensure_scores(check, ref.name)
        elif ref.kind == "window":
            stage_window(check, ds)
        elif ref.kind == "selection":
            stage_selection(check, ref, ds)
        elif ref.kind == "set":
            stage_distill(check, ref, ds)
        elif ref.kind == "evaluation":
            evaluations.append(ref)
        elif ref.kind == "tuned" and not check.status(ref).fresh:  # selmatch tune makes it
            raise MissingStagesError("run", [(ref, check.status(ref))])
    stage_evaluate(check, evaluations, ds, ReferenceCache(check, ds), workers=workers,
                   ray_address=ray_address)
    save_config(cfg)
    return stage_report(check, ds, command)


def stage_report(check: Freshness, ds, command: str | None) -> str:
    """``report.md`` and ``results.json``, rewritten when an input or the config changed."""
    cfg, ref = check.cfg, Ref("report")
    url = storage.join(cfg.run_dir, "report.md")
    if check.status(ref).fresh and storage.exists(url):
        log.info("report: present and fresh, skipped: %s", url)
        return url
    made = check.wanted(ref)
    url = write_report(cfg, title=f"selmatch report: {cfg.data.name}, IPC {cfg.select.ipc}",
                       config_text=dump_yaml(cfg), notes=_notes(cfg, ds, check), command=command,
                       stamp={"stamp": digest(made), "made_of": made})
    log.info("report: %s", url)
    return url


def run_window(cfg: RunConfig) -> dict:
    """``selmatch window``: the β grid search and the best-window set at the chosen β, each
    reused when fresh; returns the search's results."""
    check_not_busy(cfg.run_dir)
    ds = load_configured(cfg.data)
    check = Freshness(cfg, ds)
    check.require("window")
    storage.check_writable(cfg.run_dir)
    with run_dir_lock(cfg.run_dir, "selmatch window"):
        save_config(cfg)
        results = stage_window(check, ds)
        stage_selection(check, Ref("selection", "window", cfg.seed), ds)
    return results


def cmd_window(args, overrides: list[str]) -> int:
    """``selmatch window``: the β grid search and the best-window set at the chosen β."""
    cfg = load_config(args.config, overrides)
    run_window(cfg)
    print(url_of(cfg, Ref("window")))
    return 0


def evaluate_present(cfg: RunConfig, *, workers: int | None = 0,
                     ray_address: str | None = None) -> list[str]:
    """Evaluate every chosen row whose set is present (and fresh); returns the records' URLs."""
    check_not_busy(cfg.run_dir)
    check = Freshness(cfg)
    check.require("evaluate")
    present = present_sets(cfg)
    if not present:
        raise FileNotFoundError(f"no synthetic sets of the chosen rows in "
                                f"{storage.join(cfg.run_dir, 'synset')}; create them with "
                                f"`selmatch distill` or `selmatch run`")
    # the freshness rule of `selmatch run`: only sets this config would make are evaluated
    problems = check.problems(present)
    if problems:
        raise MissingStagesError("evaluate", problems)
    storage.check_writable(cfg.run_dir)
    ds = load_configured(cfg.data)
    check.ds = ds
    refs = [Ref("evaluation", row, cfg.seed) for row in chosen_rows(cfg)
            if set_ref(row, cfg.seed) in present]
    with run_dir_lock(cfg.run_dir, "selmatch evaluate"):
        save_config(cfg)
        stage_evaluate(check, refs, ds, ReferenceCache(check, ds), workers=workers,
                       ray_address=ray_address)
    return [url_of(cfg, ref) for ref in refs]


def cmd_evaluate(args, overrides: list[str]) -> int:
    """``selmatch evaluate``: evaluate every chosen row whose set is present (and fresh)."""
    cfg = load_config(args.config, overrides)
    for url in evaluate_present(cfg, workers=args.workers, ray_address=args.ray_address):
        print(url)
    return 0


def cmd_run(args, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides)
    log_summary(cfg, ranks=1, device=device_for())
    command = "selmatch " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(run_pipeline(cfg, workers=args.workers, ray_address=args.ray_address, command=command))
    return 0
