"""One whole distillation around the loop of distill/distiller.py: what it needs, the run
directory's lock, the config it writes, a fresh result skipped, a checkpoint resumed.

    distill_set(cfg, "selmatch")                          # selmatch distill / distill/main.py
    distill_set(cfg, "mtt", seed=1)                       # selmatch run, repetition seed 1
    distill_trial(base, trial_cfg, pool=ctx.pool, ...)    # an α trial of selmatch tune

Every artifact it reads and writes is judged by distill/freshness.py against the stage table
(distill/artifacts.py): a missing or stale input (experts, scores, the window search that
decides the start) is refused naming the command that makes it; a result that is present and
fresh is skipped unless ``force``; a checkpoint continues only to the result it was written for.
Everything that can refuse the run is checked before anything is written, so a refused run
leaves the run directory as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator

import numpy as np

from distill import integrity, storage
from distill.artifacts import Ref, digest, reads
from distill.config import RunConfig
from distill.config_io import dump_yaml, load_config, save_config
from distill.data import Dataset, load_configured
from distill.distiller import Distiller, StaleCheckpointError, initial_set
from distill.freshness import Freshness, MissingStagesError, url_of
from distill.lock import RunDirBusyError, acquire, check_not_busy, release
from distill.methods import distill_config, method_name
from distill.metrics import JsonlSink, Metrics, tensorboard_sinks
from distill.preflight import log_summary
from distill.runtime import Runtime, launched_rank
from distill.scores import load_scores
from distill.selection import Start, needs_scores
from distill.synset import SyntheticSet, load_synset
from distill.trajectories import ExpertStore
from launch.exits import arguments_text, run_guarded

log = logging.getLogger(__name__)


class ConcurrentWriterError(RuntimeError):
    """Another command wrote this run directory while a distillation ran."""


class Job:
    """What one distillation makes: set ``name`` with config ``cfg`` (the fields its row fixes
    applied) from the experts and scores of run ``base``; its start, and the stamps of the set,
    its initial set and its checkpoint."""

    def __init__(self, check: Freshness, name: str, cfg: RunConfig, seed: int | None,
                 pool: np.ndarray | None = None):
        self.check, self.name, self.cfg, self.seed = check, name, cfg, seed
        extra = {} if pool is None else {"pool": digest(np.asarray(pool).tolist())}
        self.made = {kind: check.wanted(Ref(kind, name, seed), cfg=cfg, more=extra)
                     for kind in ("set", "init", "checkpoint")}
        self.start = Start(**self.made["set"]["extra"]["start"])
        self.pool = pool

    def stamp(self, kind: str) -> str:
        return digest(self.made[kind])

    def url(self, kind: str) -> str:
        return url_of(self.cfg, Ref(kind, self.name))

    def meta(self, kind: str, **more) -> dict:
        c = self.cfg
        return {"method": self.name if kind == "set" else f"{self.name}_init",
                "artifact": kind, "dataset": c.data.name, "ipc": c.select.ipc,
                "alpha": c.distill.alpha, "alpha_source": alpha_source(c, self.name),
                "beta": self.start.beta, "init": self.start.init, "start": self.start.to_dict(),
                "seed": c.seed, "iterations": c.distill.iterations,
                "stamp": self.stamp(kind), "made_of": self.made[kind], **more}


def alpha_source(cfg: RunConfig, name: str) -> str:
    """Where a set's α came from: fixed by its row (mtt, init_full), tune, or the config."""
    from distill.methods import FIXED

    if "distill.alpha" in FIXED.get(name, {}):
        return "fixed by the row"
    return "tune" if cfg.tuned else "config"


def distill_set(base: RunConfig, name: str, *, seed: int | None = None, resume: bool = False,
                force: bool = False, restart_stale: bool = False, runtime: Runtime | None = None,
                progress: bool = True, ds: Dataset | None = None, preflight: bool = True,
                check: Freshness | None = None) -> SyntheticSet | None:
    """Distil set ``name`` of run ``base`` (of repetition ``seed``: in its directory, on the
    run's experts and scores); None when it is present and fresh (and not ``force``).
    ``restart_stale``: with ``resume``, a checkpoint that cannot continue to this result is
    ignored (the run starts over) instead of refused. The run directory's holder is named
    before anything else (it may be making the inputs this run would call missing)."""
    rt = runtime or Runtime.create()
    _on_main(rt, lambda: check_not_busy(base.run_dir))
    ds = ds if ds is not None else load_configured(base.data)
    check = check or Freshness(base, ds)
    ref = Ref("set", name, seed)
    problems = check.problems(reads(base, ref))
    if problems:  # every rank reads the same files: every rank raises
        raise MissingStagesError("distill", problems)
    status = check.status(ref)
    where = "" if seed is None else f" (seed {seed})"
    if status.fresh and not force:
        if rt.is_main:
            log.info("distill %s%s: present and fresh, skipped (--force makes it again)", name,
                     where)
        return None
    if rt.is_main and status.damaged:
        log.warning("%s: making it again", status.why)
    elif rt.is_main:
        log.info("distill %s%s: %s", name, where, "fresh, made again (--force)"
                 if status.fresh else status.why)
    cfg = distill_config(check.rep(ref), name)
    job = Job(check, name, cfg, seed)
    with _locked(cfg.run_dir, rt, f"selmatch distill ({name})"):
        return _distill(job, base, ds, rt, resume=resume, restart_stale=restart_stale,
                        progress=progress, preflight=preflight)


def run_distill(cfg: RunConfig, **kwargs) -> SyntheticSet:
    """Distil the set ``cfg`` describes (distill.methods.method_name) and return it: the
    finished one loaded from the run directory when it is present and fresh. Keywords: those of
    :func:`distill_set`."""
    name = method_name(cfg)
    synset = distill_set(cfg, name, **kwargs)
    if synset is None:
        synset = load_synset(cfg.run_dir, name)[0]
    return synset


def distill_trial(base: RunConfig, cfg: RunConfig, *, pool: np.ndarray, ds: Dataset,
                  runtime: Runtime, progress: bool = False) -> SyntheticSet:
    """An α trial's shortened distillation (``cfg``: its own run directory, a pinned start) on
    ``base``'s experts and scores, selecting among ``pool``: resumed from its checkpoint when
    killed, the finished set reused when fresh."""
    job = Job(Freshness(base, ds), "selmatch", cfg, None, pool=pool)
    with _locked(cfg.run_dir, runtime, "selmatch tune (alpha trial)"):
        if storage.exists(job.url("set")):
            try:
                synset, state = load_synset(cfg.run_dir, "selmatch", image_shape=ds.image_shape,
                                            num_classes=ds.num_classes)
                if state.get("meta", {}).get("stamp") == job.stamp("set"):
                    return synset
            except integrity.DamagedArtifactError as err:
                log.warning("%s: distilling it again", err)
        return _distill(job, base, ds, runtime, resume=True, restart_stale=True,
                        progress=progress, preflight=False)


def _on_main(rt: Runtime, check) -> None:
    """Run ``check`` on rank 0; every rank raises what it raised (no rank left waiting)."""
    problem = None
    if rt.is_main:
        try:
            check()
        except (storage.RunDirError, RunDirBusyError) as err:
            problem = err
    problem = rt.broadcast_object(problem)
    if problem is not None:
        raise problem


@contextlib.contextmanager
def _locked(run_dir: str, rt: Runtime, command: str) -> Iterator[None]:
    """Rank 0 checks and takes ``run_dir``'s lock, and every rank learns the verdict (no rank
    left waiting in a collective); released at the end."""
    taken: list[str] = []

    def take() -> None:
        storage.check_writable(run_dir)
        taken.append(acquire(run_dir, command))

    _on_main(rt, take)
    try:
        yield
    finally:
        for url in taken:
            release(url)


def _distill(job: Job, base: RunConfig, ds: Dataset, rt: Runtime, *, resume: bool,
             restart_stale: bool, progress: bool, preflight: bool) -> SyntheticSet:
    cfg, name = job.cfg, job.name
    scores = None
    if needs_scores(job.start.init, cfg.distill.alpha):  # the run's, also for a repetition
        kind = cfg.scores.topk if job.start.init == "topk" else cfg.scores.kind
        scores = load_scores(base.run_dir, kind)
    synset = initial_set(cfg, ds, job.start, scores, job.pool)
    log.info("%s: %s, %d images (%d learnable), start %s, %s", name, cfg.data.name, len(synset),
             len(synset.distilled), job.start.describe(), rt.describe())
    distiller = None
    if len(synset.distilled) and cfg.distill.iterations:
        synset = synset.to(rt.device)
        distiller = _distiller(job, base, ds, synset, rt, resume=resume,
                               restart_stale=restart_stale)
    return _distill_and_save(job, rt, ds, synset, distiller, progress, preflight)


def _distill_and_save(job: Job, rt: Runtime, ds: Dataset, synset: SyntheticSet,
                      distiller: Distiller | None, progress: bool,
                      preflight: bool) -> SyntheticSet:
    cfg = job.cfg
    # checks done: from here on the run writes
    if rt.is_main and preflight:
        log_summary(cfg, ranks=rt.world_size, device=rt.device.type)
    if rt.is_main:
        save_config(cfg)
        storage.write_json(storage.join(cfg.run_dir, "data.json"), ds.describe())
        # the exact starting point (selection, learnable rows marked), kept for comparisons
        synset.save(cfg.run_dir, f"{job.name}_init", meta=job.meta("init"), dataset=ds)
    if distiller is None:
        log.info("nothing to distill (alpha %.3g, %d iterations): the result is the selection",
                 cfg.distill.alpha, cfg.distill.iterations)
    else:
        distiller.run(checkpoint_url=job.url("checkpoint"), progress=progress)
        distiller.metrics.close()
    if rt.is_main:
        _check_single_writer(job)
        synset.save(cfg.run_dir, job.name,
                    meta=job.meta("set", syn_lr=float(synset.syn_lr.detach())), dataset=ds)
    rt.barrier()
    return synset


def _check_single_writer(job: Job) -> None:
    """Before the result is saved: ``config.yaml`` and the initial set on storage are still the
    ones this run wrote. The run-directory lock (distill/lock.py) keeps a second command out of a
    local or shared filesystem; on an object store, where a lock cannot be atomic, this is what
    keeps two commands' results from mixing (a set saved next to another command's config)."""
    cfg = job.cfg
    config_url = storage.join(cfg.run_dir, "config.yaml")
    init_url = job.url("init")
    problems = []
    if not storage.exists(config_url) or storage.read_text(config_url) != dump_yaml(cfg):
        problems.append(f"{config_url} is not the configuration this run wrote")
    meta = {}
    if storage.exists(init_url):
        from distill.synset import read_synset_state

        meta = read_synset_state(init_url).get("meta", {})
    if meta.get("stamp") != job.stamp("init"):
        problems.append(f"{init_url} is not the starting set this run wrote")
    if problems:
        raise ConcurrentWriterError(
            f"another command wrote {cfg.run_dir} while this distillation ran: "
            f"{'; '.join(problems)}. The result is not saved (its checkpoint is kept); run one "
            f"command per run directory, then run this one again")


def _distiller(job: Job, base: RunConfig, ds: Dataset, synset: SyntheticSet, rt: Runtime, *,
               resume: bool, restart_stale: bool) -> Distiller:
    """The Distiller, resumed from the checkpoint when asked (and refused before any write when
    the checkpoint cannot continue to this result)."""
    cfg, name = job.cfg, job.name
    ckpt = job.url("checkpoint")
    metrics_url = storage.join(cfg.run_dir, "logs", f"distill_{name}.jsonl")
    sinks = [JsonlSink(metrics_url), *tensorboard_sinks(cfg, f"distill_{name}", base)] \
        if rt.is_main else []
    distiller = Distiller(cfg, ds, synset, ExpertStore(base), comm=rt, device=rt.device,
                          metrics=Metrics(sinks), is_main=rt.is_main, name=name,
                          stamp=job.stamp("checkpoint"), made_of=job.made["checkpoint"])
    if resume and storage.exists(ckpt):
        try:
            distiller.load_checkpoint(ckpt)
        except (StaleCheckpointError, integrity.DamagedArtifactError) as err:
            if not restart_stale:
                raise
            log.warning("%s: starting from iteration 0", err)
            return distiller
        distiller.metrics.resume_after(distiller.iteration)  # metrics up to the checkpoint
        log.info("resumed from %s at iteration %d", ckpt, distiller.iteration)
    elif resume:
        log.info("no checkpoint at %s; starting from iteration 0", ckpt)
    return distiller


def cmd_distill(args, overrides: list[str]) -> int:
    """``selmatch distill``: one process, or one rank per process under ``accelerate launch -m
    launch.cli distill`` (the process group is torn down here too)."""
    return run_entry(Runtime.create(), load_config(args.config, overrides), resume=args.resume,
                     force=args.force)


def run_entry(rt: Runtime, cfg: RunConfig, *, resume: bool = False, force: bool = False) -> int:
    """Distil the set ``cfg`` describes, and tear the process group down once: with a barrier
    when every rank got to the end, at once when this one raised (Runtime.close)."""
    ok = False
    try:
        distill_set(cfg, method_name(cfg), resume=resume, force=force, runtime=rt)
        ok = True
    finally:
        rt.close(ok=ok)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``accelerate launch distill/main.py --config F [--resume] [--force] [overrides]``."""
    parser = argparse.ArgumentParser(description="SelMatch distillation (trajectory matching)",
                                     allow_abbrev=False)
    parser.add_argument("--config", required=True, help="YAML config (path or fsspec URL)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--force", action="store_true",
                        help="distil again even when the result is present and fresh")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is present")
    args, overrides = parser.parse_known_args(argv)

    rank = launched_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")

    def work() -> int:
        cfg = load_config(args.config, overrides)  # bad input: found alike on every rank
        rt = Runtime.create(cpu=True if args.cpu else None)
        return run_entry(rt, cfg, resume=args.resume, force=args.force)

    # under a launcher, bad input (exit 2) is reported by rank 0 alone: every rank reads the same
    # config and run directory and fails alike; other failures are reported by each failing rank
    return run_guarded("distill" if rank == 0 else f"distill (rank {rank})", work,
                       arguments=arguments_text(args.config, overrides),
                       quiet_input_errors=rank != 0)  # exit statuses: launch/exits.py
