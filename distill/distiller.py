"""The distillation loop: sample an expert segment, match, update D_distill and syn_lr, checkpoint;
and :func:`run_distill`, one whole distillation (select, distill, save), which
``distill/main.py``, ``selmatch distill`` and ``selmatch run`` call.

Every random choice is a function of (run seed, iteration): which expert, which start epoch, the
batches and the augmentation. A checkpoint therefore needs no RNG state, and a run resumed from
iteration k ends bit for bit where an uninterrupted run ends (on CPU; tested).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from distill import integrity, storage
from distill.augment import training_dsa
from distill.batching import idle_ranks, resolve_config
from distill.config import RunConfig, syn_lr_init
from distill.config_io import dump_yaml, save_config
from distill.data import Dataset, load_configured
from distill.experts import build_network
from distill.freshness import digest, made_of, stamp
from distill.lock import RunDirBusyError, acquire, release
from distill.matching import LOCAL, Collectives, make_plan, match_replay, theta_pair
from distill.metrics import JsonlSink, Metrics, tensorboard_sinks
from distill.preflight import log_summary
from distill.prerequisites import require_stages
from distill.rng import SEGMENT
from distill.runtime import Runtime, cpu_threads
from distill.scores import load_scores, scores_digest
from distill.selection import make_selection
from distill.student import Student, set_precision
from distill.synset import SyntheticSet, read_synset_state
from distill.trajectories import ExpertStore, TrajectoryCache

log = logging.getLogger(__name__)

_LOSS_START = 5  # iterations whose mean loss is the divergence guard's reference


class DivergenceError(FloatingPointError):
    """The matching loss or a gradient became NaN/Inf."""


def method_name(cfg: RunConfig) -> str:
    """Artifact name of the distilled set: merge, mtt (random init) or selmatch."""
    if cfg.distill.mode == "merge":
        return "merge"
    return "mtt" if cfg.select.init == "random" else "selmatch"


def resume_hash(cfg: RunConfig, experts_digest: str) -> str:
    """Everything that must not change between a checkpoint and its resumption: the stage's
    fields but the iteration count (distill/freshness.py) and the experts' identity. The initial
    selection is compared row by row (``source_index``) when the checkpoint is loaded."""
    return stamp(cfg, "distill_resume", inputs={"experts": experts_digest})


CHECKPOINT_KEYS = ("iteration", "method", "resume_hash", "distilled", "syn_lr", "source_index",
                   "opt_images", "opt_lr", "history")
CHECKPOINT_FIX = "delete it, or run without --resume to start over"


class ConcurrentWriterError(RuntimeError):
    """Another command wrote this run directory while a distillation ran."""


class StaleCheckpointError(ValueError):
    """A checkpoint that cannot continue to the requested result (other settings, experts or
    selection, or past the requested iteration count)."""


def check_resumable(state: dict, cfg: RunConfig, key: str, url: str) -> None:
    """Raise StaleCheckpointError unless checkpoint ``state`` can continue to ``cfg``'s result."""
    if state.get("resume_hash") != key:
        raise StaleCheckpointError(
            f"{url} was written with other settings or experts (only distill.iterations, "
            f"checkpoint_every, log_every, check_every and num_threads may change on --resume); "
            f"run without --resume to start over")
    if int(state["iteration"]) > cfg.distill.iterations:
        raise StaleCheckpointError(
            f"{url} is at iteration {int(state['iteration'])}, past distill.iterations = "
            f"{cfg.distill.iterations}: a shorter run cannot continue from it; run without "
            f"--resume to start over")


def peak_memory(device: torch.device) -> tuple[str, str, float]:
    """(metric key, log label, MiB) of what this process has used at most so far: on CUDA the
    tensors PyTorch's allocator has held (``max_memory_allocated``), on CPU the resident set
    size (``ru_maxrss``: interpreter, libraries, data and all). Not the estimate's figure, which
    models the matching step's own tensors only (distill/estimate.py)."""
    if device.type == "cuda":
        return ("cuda_peak_allocated_mib", "CUDA peak allocated",
                torch.cuda.max_memory_allocated(device) / 2**20)
    return "peak_rss_mib", "process peak RSS", \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Distiller:
    def __init__(self, cfg: RunConfig, ds: Dataset, synset: SyntheticSet, store: ExpertStore, *,
                 comm: Collectives = LOCAL, device: torch.device | str = "cpu",
                 metrics: Metrics | None = None, is_main: bool = True, method: str | None = None):
        self.cfg, self.ds, self.synset = cfg, ds, synset
        self.name = method or method_name(cfg)  # the artifact name (progress bar, logs)
        self.comm, self.device, self.is_main = comm, torch.device(device), is_main
        self.metrics = metrics or Metrics()
        self.method = method_name(cfg)
        self.expert_ids = store.require()  # every configured expert, intact, or an error
        self.resume_key = resume_hash(cfg, store.digest())
        self.trajectories = TrajectoryCache(store)
        dtype = synset.distilled.dtype
        self.dsa = training_dsa(cfg.distill.augment)
        self.precision = set_precision(cfg.distill.precision, self.device)
        self.student = Student.of(build_network(cfg, ds).to(self.device), self.dsa, dtype,
                                  self.device, compile=cfg.distill.compile,
                                  cuda_graphs=cfg.distill.cuda_graphs,
                                  groups_per_call=cfg.distill.groups_per_call,
                                  team=comm.team(cfg.distill.group_ranks))
        # merge (ablation): D_distill is matched alone and concatenated afterwards
        batching = resolve_config(cfg, ds.num_classes).check()  # the rule validation applied
        self.batch, self.group = batching.batch, batching.group
        idle = idle_ranks(self.batch, self.group, cfg.distill.group_ranks, comm.world_size)
        if idle is not None and is_main:
            log.warning("%s", idle)
        momentum = cfg.distill.momentum
        self.opt_images = torch.optim.SGD([synset.distilled], lr=cfg.distill.lr_images,
                                          momentum=momentum)
        self.opt_lr = torch.optim.SGD([synset.syn_lr], lr=cfg.distill.lr_lr, momentum=momentum)
        self.iteration = 0
        self.history: list[dict] = []
        # divergence guard: how far the learnable images may leave the real data's range
        self.real_abs_max = float(ds.x_train.abs().max())

    # -- one iteration -----------------------------------------------------------------------

    def sample_segment(self, iteration: int) -> tuple[int, int]:
        gen = SEGMENT.generator(self.cfg.seed, iteration)
        expert = self.expert_ids[int(torch.randint(len(self.expert_ids), (1,), generator=gen))]
        start = int(torch.randint(self.cfg.distill.max_start_epoch, (1,), generator=gen))
        return expert, start

    def _matched_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.synset
        if self.method == "merge":
            return s.distilled.detach(), s.labels[s.is_distilled.to(s.labels.device)]
        return s.images().detach(), s.labels

    def step(self, iteration: int) -> dict:
        d = self.cfg.distill
        t0 = time.perf_counter()
        expert, start_epoch = self.sample_segment(iteration)
        start, target = theta_pair(self.trajectories(expert), start_epoch, d.expert_epochs,
                                   self.synset.distilled.dtype, self.device)
        images, labels = self._matched_images()
        plan = make_plan(len(images), batch=self.batch, steps=d.syn_steps, group=self.group,
                         image_size=tuple(images.shape[-2:]), dsa=self.dsa, seed=self.cfg.seed,
                         iteration=iteration)
        res = match_replay(self.student, start, target, images, labels, self.synset.syn_lr, plan,
                           comm=self.comm)
        grad = res.grad_images if self.method == "merge" else \
            res.grad_images[self.synset.is_distilled.to(res.grad_images.device)]
        self._check_finite(iteration, res.loss, grad, res.grad_lr)
        self.opt_images.zero_grad(set_to_none=False)
        self.opt_lr.zero_grad(set_to_none=False)
        self.synset.distilled.grad = grad.reshape(self.synset.distilled.shape).clone()
        self.synset.syn_lr.grad = res.grad_lr.reshape(()).clone()
        self.opt_images.step()
        self.opt_lr.step()
        seconds = time.perf_counter() - t0
        return {"iteration": iteration, "loss": float(res.loss), "syn_lr": float(self.synset.syn_lr.detach()),
                "expert": expert, "start_epoch": start_epoch, "seconds": round(seconds, 4),
                "image_steps_per_s": round(self.batch * d.syn_steps / seconds, 1)}

    def _check_finite(self, iteration: int, loss, grad, grad_lr) -> None:
        if not (math.isfinite(float(loss)) and bool(torch.isfinite(grad).all())
                and math.isfinite(float(grad_lr))):
            raise DivergenceError(
                f"matching loss or gradient is not finite at iteration {iteration} "
                f"(loss {float(loss)}); the last good checkpoint is kept. Lower "
                f"distill.lr_images or distill.lr_lr, or distill.syn_steps")

    def _check_blowup(self, iteration: int, loss: float) -> None:
        """Stop a run that has blown up while staying finite (e.g. ``distill.lr_images 1e12``:
        pixels near 1e9 that evaluate at chance). Runs before the iteration's checkpoint, so the
        checkpoint on disk is always the last state that passed."""
        d = self.cfg.distill
        keep = (f"the last good checkpoint is kept. Lower distill.lr_images (now "
                f"{d.lr_images:g}) or distill.lr_lr (now {d.lr_lr:g})")
        if d.max_image_ratio is not None and len(self.synset.distilled):
            peak = float(self.synset.distilled.detach().abs().max())
            if peak > d.max_image_ratio * self.real_abs_max:
                raise DivergenceError(
                    f"distillation diverged at iteration {iteration}: a learnable image reaches "
                    f"|x| = {peak:.3g}, more than distill.max_image_ratio = {d.max_image_ratio:g} "
                    f"times the real images' largest |x| = {self.real_abs_max:.3g}; {keep}")
        start = [h["loss"] for h in self.history[:_LOSS_START]]
        if d.max_loss_ratio is not None and len(start) == _LOSS_START:
            ref = sum(start) / len(start)
            if loss > d.max_loss_ratio * ref:
                raise DivergenceError(
                    f"distillation diverged at iteration {iteration}: matching loss {loss:.4g} is "
                    f"more than distill.max_loss_ratio = {d.max_loss_ratio:g} times its start "
                    f"({ref:.4g}, mean of the first {_LOSS_START} iterations); {keep}")

    # -- loop --------------------------------------------------------------------------------

    def run(self, *, checkpoint_url: str | None = None, progress: bool = True) -> list[dict]:
        d = self.cfg.distill
        with cpu_threads(d.num_threads):
            return self._run(checkpoint_url, progress)

    def _run(self, checkpoint_url: str | None, progress: bool) -> list[dict]:
        d = self.cfg.distill
        bar = tqdm(range(self.iteration, d.iterations), initial=self.iteration, total=d.iterations,
                   desc=f"distill {self.name}", disable=not (progress and self.is_main))
        self.check_ranks()
        for it in bar:
            record = self.step(it)
            self._check_blowup(it, record["loss"])
            self.iteration = it + 1
            due_checkpoint = bool(checkpoint_url) and (self.iteration % d.checkpoint_every == 0
                                                       or self.iteration == d.iterations)
            if (self.iteration % d.check_every == 0 or due_checkpoint
                    or self.iteration == d.iterations):
                self.check_ranks()  # before a checkpoint: never save one rank's drifted state
            self.history.append({k: record[k] for k in ("iteration", "loss", "syn_lr")})
            bar.set_postfix(loss=f"{record['loss']:.4f}", syn_lr=f"{record['syn_lr']:.4g}")
            if self.iteration % d.log_every == 0 or self.iteration == d.iterations:
                key, label, mib = peak_memory(self.device)
                record[key] = round(mib, 1)
                self.metrics.log(step=self.iteration, **record)
                if self.is_main:
                    log.info("it %d/%d loss %.4f syn_lr %.5g %.0f img-steps/s, %s %.0f MiB",
                             self.iteration, d.iterations, record["loss"], record["syn_lr"],
                             record["image_steps_per_s"], label, mib)
            if due_checkpoint:
                self.save_checkpoint(checkpoint_url)
        return self.history

    def check_ranks(self) -> None:
        """Every rank must hold bit-identical state (images, syn_lr, momenta); raises
        ``DivergedRanksError`` on every rank otherwise. A no-op with one process.

        Ranks apply the same all-reduced gradients to the same state, so any difference means a
        bug, a non-deterministic kernel or different inputs on different nodes; caught here, it
        cannot silently end up in a checkpoint written by rank 0 alone.
        """
        check = getattr(self.comm, "check_identical", None)  # LocalCollectives has none
        if check is None or self.comm.world_size == 1:
            return
        tensors = [self.synset.distilled, self.synset.syn_lr]
        for opt in (self.opt_images, self.opt_lr):
            for state in opt.state.values():
                if state.get("momentum_buffer") is not None:
                    tensors.append(state["momentum_buffer"])
        check(*tensors, what=f"distilled images, syn_lr or momenta at iteration {self.iteration}")

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        return {
            "iteration": self.iteration,
            "method": self.method,
            "resume_hash": self.resume_key,
            "distilled": self.synset.distilled.detach().cpu().clone(),
            "syn_lr": self.synset.syn_lr.detach().cpu().clone(),
            "source_index": self.synset.source_index.cpu(),
            "opt_images": self.opt_images.state_dict(),
            "opt_lr": self.opt_lr.state_dict(),
            "history": list(self.history),
        }

    def save_checkpoint(self, url: str) -> None:
        if self.is_main:
            integrity.torch_save(url, self.checkpoint_state())
            self.metrics.flush()

    def load_checkpoint(self, url: str) -> None:
        """Continue from checkpoint ``url``: verified (DamagedArtifactError when its bytes
        changed or a key is missing) and checked to continue to this config's result
        (StaleCheckpointError otherwise)."""
        state = integrity.torch_load(url, fix=CHECKPOINT_FIX, keys=CHECKPOINT_KEYS)
        if not torch.equal(state["source_index"], self.synset.source_index.cpu()):
            raise StaleCheckpointError(f"{url}: its synthetic set was selected from other images "
                                       f"(other scores or selection); run without --resume to "
                                       f"start over")
        check_resumable(state, self.cfg, self.resume_key, url)
        with torch.no_grad():
            self.synset.distilled.copy_(state["distilled"].to(self.synset.distilled))
            self.synset.syn_lr.copy_(state["syn_lr"].to(self.synset.syn_lr))
        self.opt_images.load_state_dict(state["opt_images"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])


# --------------------------------------------------------------------------------------------
# One whole distillation: select, distill, save
# --------------------------------------------------------------------------------------------


def initial_set(cfg: RunConfig, ds: Dataset, source: RunConfig | None = None,
                pool: np.ndarray | None = None) -> SyntheticSet:
    """The selection of ``select.init`` as a synthetic set (float32, CPU); scores are read from
    ``source.run_dir`` (default: ``cfg``'s); ``pool``: select among these training indices only
    (an α trial's pool: distill/search.py)."""
    scores = None if cfg.select.init == "random" else \
        load_scores((source or cfg).run_dir, cfg.scores.kind)
    sel = make_selection(cfg.select.init, scores=scores, labels=ds.y_train.numpy(),
                         num_classes=ds.info.num_classes, ipc=cfg.select.ipc,
                         beta=cfg.select.beta, alpha=cfg.distill.alpha, seed=cfg.seed,
                         pool=pool)
    return SyntheticSet.from_selection(sel, ds.x_train, syn_lr_init(cfg))


def result_made_of(cfg: RunConfig, source: RunConfig | None = None,
                   pool: np.ndarray | None = None) -> dict:
    """What makes a distilled set (distill/freshness.py): every field of the stage, iterations
    included, and the identity of the experts and scores it was made from (and of the pool it
    selected from, when not the whole training set)."""
    src = source or cfg
    inputs = {"experts": ExpertStore(src).digest()}
    if cfg.select.init != "random":
        inputs["scores"] = scores_digest(src.run_dir, cfg.scores.kind)
    if pool is not None:
        inputs["pool"] = digest(np.asarray(pool).tolist())
    return made_of(cfg, "distill", inputs=inputs)


def result_stamp(cfg: RunConfig, source: RunConfig | None = None,
                 pool: np.ndarray | None = None) -> str:
    """The freshness stamp of a distilled set: the hash of :func:`result_made_of`."""
    return digest(result_made_of(cfg, source, pool))


def _meta(cfg: RunConfig, method: str, stamp_: str, **extra) -> dict:
    return {"method": method, "dataset": cfg.data.name, "ipc": cfg.select.ipc,
            "alpha": cfg.distill.alpha, "beta": cfg.select.beta, "init": cfg.select.init,
            "seed": cfg.seed, "iterations": cfg.distill.iterations, "stamp": stamp_, **extra}


def run_distill(cfg: RunConfig, *, resume: bool = False, runtime: Runtime | None = None,
                progress: bool = True, source: RunConfig | None = None,
                method: str | None = None, restart_stale: bool = False,
                pool: np.ndarray | None = None, ds: Dataset | None = None,
                preflight: bool = True) -> SyntheticSet:
    """Select, distill and save; returns the final synthetic set.

    ``source``: the run whose experts and scores are used (default ``cfg``; ``selmatch run``
    repeats distillation per seed in ``run_dir/seeds/<s>`` on the main run's experts, and an α
    trial of ``selmatch tune`` distils in its own directory). ``method``: the artifact name
    (default :func:`method_name`). ``restart_stale``: with ``resume``, a checkpoint that cannot
    continue to this result is ignored (the run starts over) instead of refused. ``pool``: select
    among these training indices only. ``ds``: the loaded dataset (default: load ``cfg.data``).
    ``preflight``: log the estimate's summary line first. Everything that can refuse the run
    (data, scores, experts, a checkpoint from other settings, an unwritable run_dir) is checked
    before anything is written, so a refused run leaves the run directory as it was."""
    rt = runtime or Runtime.create()
    src = source or cfg
    require_stages(dataclasses.replace(src, select=cfg.select), "distill")  # source's experts
    method = method or method_name(cfg)
    ds = ds if ds is not None else load_configured(cfg.data)
    synset = initial_set(cfg, ds, src, pool)
    log.info("%s: %s, %d images (%d learnable), %s", method, cfg.data.name, len(synset),
             len(synset.distilled), rt.describe())
    distiller = None
    if len(synset.distilled) and cfg.distill.iterations:
        synset = synset.to(rt.device)
        distiller = _distiller(cfg, ds, synset, rt, method, src, resume=resume,
                               restart_stale=restart_stale)
    # rank 0 writes: it checks and takes the run directory's lock, and every rank learns the
    # verdict (no rank left waiting in a collective)
    problem, lock = None, None
    if rt.is_main:
        try:
            storage.check_writable(cfg.run_dir)
            lock = acquire(cfg.run_dir, f"selmatch distill ({method})")
        except (storage.RunDirError, RunDirBusyError) as err:
            problem = (type(err).__name__, str(err))
    problem = rt.broadcast_object(problem)
    if problem is not None:
        raise (RunDirBusyError if problem[0] == "RunDirBusyError" else storage.RunDirError)(
            problem[1])
    try:
        return _distill_and_save(cfg, rt, ds, synset, distiller, src, pool, method, progress,
                                 preflight)
    finally:
        if lock is not None:
            release(lock)


def _distill_and_save(cfg: RunConfig, rt: Runtime, ds: Dataset, synset: SyntheticSet,
                      distiller: Distiller | None, src: RunConfig, pool: np.ndarray | None,
                      method: str, progress: bool, preflight: bool) -> SyntheticSet:
    final_made_of = result_made_of(cfg, src, pool)
    final_stamp = digest(final_made_of)
    # checks done: from here on the run writes
    if rt.is_main and preflight:
        log_summary(cfg, ranks=rt.world_size, device=rt.device.type)
    if rt.is_main:
        save_config(cfg)
        storage.write_json(storage.join(cfg.run_dir, "data.json"), ds.describe())
        # the exact starting point (selection, learnable rows marked), kept for comparisons
        synset.save(cfg.run_dir, f"{method}_init",
                    meta=_meta(cfg, f"{method}_init", final_stamp, made_of=final_made_of),
                    denormalize=ds.denormalize)
    if distiller is None:
        log.info("nothing to distill (alpha %.3g, %d iterations): the result is the selection",
                 cfg.distill.alpha, cfg.distill.iterations)
    else:
        distiller.run(checkpoint_url=_checkpoint_url(cfg, method), progress=progress)
        distiller.metrics.close()
    if rt.is_main:
        _check_single_writer(cfg, method, final_stamp)
        synset.save(cfg.run_dir, method, meta=_meta(cfg, method, final_stamp,
                                                    syn_lr=float(synset.syn_lr.detach()),
                                                    made_of=final_made_of),
                    denormalize=ds.denormalize)
    rt.barrier()
    return synset


def _check_single_writer(cfg: RunConfig, method: str, final_stamp: str) -> None:
    """Before the result is saved: ``config.yaml`` and the initial set on storage are still the
    ones this run wrote. The run-directory lock (distill/lock.py) keeps a second command out of a
    local or shared filesystem; on an object store, where a lock cannot be atomic, this is what
    keeps two commands' results from mixing (a set saved next to another command's config)."""
    config_url = storage.join(cfg.run_dir, "config.yaml")
    init_url = storage.join(cfg.run_dir, "synset", f"{method}_init.pt")
    problems = []
    if not storage.exists(config_url) or storage.read_text(config_url) != dump_yaml(cfg):
        problems.append(f"{config_url} is not the configuration this run wrote")
    meta = read_synset_state(init_url).get("meta", {}) if storage.exists(init_url) else {}
    if meta.get("stamp") != final_stamp:
        problems.append(f"{init_url} is not the starting set this run wrote")
    if problems:
        raise ConcurrentWriterError(
            f"another command wrote {cfg.run_dir} while this distillation ran: "
            f"{'; '.join(problems)}. The result is not saved (its checkpoint is kept); run one "
            f"command per run directory, then run this one again")


def _checkpoint_url(cfg: RunConfig, method: str) -> str:
    return storage.join(cfg.run_dir, "checkpoints", f"{method}.pt")


def _distiller(cfg: RunConfig, ds: Dataset, synset: SyntheticSet, rt: Runtime, method: str,
               source: RunConfig, *, resume: bool, restart_stale: bool) -> Distiller:
    """The Distiller, resumed from the checkpoint when asked (and refused before any write when
    the checkpoint cannot continue to this config's result)."""
    ckpt = _checkpoint_url(cfg, method)
    metrics_url = storage.join(cfg.run_dir, "logs", f"distill_{method}.jsonl")
    sinks = [JsonlSink(metrics_url), *tensorboard_sinks(cfg, f"distill_{method}", source)] \
        if rt.is_main else []
    distiller = Distiller(cfg, ds, synset, ExpertStore(source), comm=rt, device=rt.device,
                          metrics=Metrics(sinks), is_main=rt.is_main, method=method)
    if resume and storage.exists(ckpt):
        try:
            distiller.load_checkpoint(ckpt)
        except StaleCheckpointError as err:
            if not restart_stale:
                raise
            log.info("%s; starting from iteration 0", err)
            return distiller
        except integrity.DamagedArtifactError as err:
            if not restart_stale:
                raise
            log.warning("%s: starting from iteration 0", err)
            return distiller
        distiller.metrics.resume_after(distiller.iteration)  # metrics up to the checkpoint
        log.info("resumed from %s at iteration %d", ckpt, distiller.iteration)
    elif resume:
        log.info("no checkpoint at %s; starting from iteration 0", ckpt)
    return distiller
