"""The distillation loop: sample an expert segment, match, update D_distill and syn_lr,
checkpoint. One whole distillation (what it needs, the lock, the config it writes, skipping a
fresh result, resuming) is launch/distillation.py's, which ``distill/main.py``, ``selmatch distill``,
``selmatch run`` and the α trials of ``selmatch tune`` call.

Every random choice is a function of (run seed, iteration): which expert, which start epoch, the
batches and the augmentation. A checkpoint therefore needs no RNG state, and a run resumed from
iteration k ends bit for bit where an uninterrupted run ends (on CPU; tested).
"""

from __future__ import annotations

import logging
import math
import resource
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from distill import integrity
from distill.augment import training_dsa
from distill.batching import idle_ranks, resolve_config
from distill.config import RunConfig, syn_lr_init
from distill.data import Dataset
from distill.experts import build_network
from distill.matching import LOCAL, Collectives, make_plan, match_replay, theta_pair
from distill.metrics import Metrics
from distill.rng import SEGMENT
from distill.runtime import cpu_threads
from distill.scores import Scores, load_scores
from distill.selection import Start, make_selection, needs_scores, resolve_start
from distill.student import BACKEND, Student, set_precision
from distill.synset import SyntheticSet
from distill.trajectories import ExpertStore, TrajectoryCache

log = logging.getLogger(__name__)

_LOSS_START = 5  # iterations whose mean loss is the divergence guard's reference


class DivergenceError(FloatingPointError):
    """The matching loss or a gradient became NaN/Inf, or a divergence guard stopped the run."""


def _round_down(x: float) -> float:
    """``x`` rounded down to one significant digit (a value to suggest: 3.7e-6 -> 3e-6)."""
    exponent = math.floor(math.log10(x))
    return math.floor(x / 10 ** exponent) * 10 ** exponent


CHECKPOINT_KEYS = ("iteration", "method", "stamp", "made_of", "distilled", "syn_lr",
                   "source_index", "opt_images", "opt_lr", "history")
CHECKPOINT_FIX = "delete it, or run without --resume to start over"


def check_checkpoint(state: dict, url: str, synset: SyntheticSet) -> None:
    """A DamagedArtifactError naming ``url`` unless checkpoint ``state`` has the types and
    shapes that continuing ``synset``'s distillation needs (a re-signed or hand-edited file
    fails here with its field, not deep inside a tensor copy)."""
    problems = []
    it = state["iteration"]
    if isinstance(it, bool) or not isinstance(it, int) or it < 0:
        problems.append(f"iteration is {it!r:.40}, not an integer >= 0")
    want = {"distilled": tuple(synset.distilled.shape), "syn_lr": (),
            "source_index": tuple(synset.source_index.shape)}
    for key, shape in want.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != shape:
            problems.append(f"{key} has shape {list(value.shape)}, this run's is {list(shape)}")
        elif key != "source_index" and not value.is_floating_point():
            problems.append(f"{key} holds {value.dtype}, not floating-point values")
    for key in ("opt_images", "opt_lr"):
        if not isinstance(state[key], dict) or not {"state", "param_groups"} <= set(state[key]):
            problems.append(f"{key} is not an optimiser state")
    if not isinstance(state["history"], list):
        problems.append(f"history is a {type(state['history']).__name__}, not a list")
    if problems:
        raise integrity.DamagedArtifactError(url, "; ".join(problems), CHECKPOINT_FIX)


class StaleCheckpointError(ValueError):
    """A checkpoint that cannot continue to the requested result (other settings, experts or
    selection, or past the requested iteration count)."""


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
    """One distillation's loop and its checkpoints. ``name``: the set's artifact name (progress
    bar, logs); ``stamp``: what its checkpoints record as the result they continue to
    (distill/artifacts.py; a checkpoint of another stamp is refused); ``backend``: the compiled
    path's torch.compile backend (distill/student.py)."""

    def __init__(self, cfg: RunConfig, ds: Dataset, synset: SyntheticSet, store: ExpertStore, *,
                 comm: Collectives = LOCAL, device: torch.device | str = "cpu",
                 metrics: Metrics | None = None, is_main: bool = True, name: str = "selmatch",
                 stamp: str = "", made_of: dict | None = None, backend: str = BACKEND):
        self.cfg, self.ds, self.synset = cfg, ds, synset
        self.name = name
        self.comm, self.device, self.is_main = comm, torch.device(device), is_main
        self.metrics = metrics or Metrics()
        self.merge = cfg.distill.mode == "merge"  # D_distill is matched alone
        self.expert_ids = store.require()  # every configured expert, intact, or an error
        self.resume_key, self.made_of = stamp, dict(made_of or {})
        self.trajectories = TrajectoryCache(store)
        dtype = synset.distilled.dtype
        self.dsa = training_dsa(cfg.distill.augment)
        self.precision = set_precision(cfg.distill.precision, self.device)
        self.student = Student.of(build_network(cfg, ds).to(self.device), self.dsa, dtype,
                                  self.device, compile=cfg.distill.compile,
                                  cuda_graphs=cfg.distill.cuda_graphs,
                                  groups_per_call=cfg.distill.groups_per_call,
                                  team=comm.team(cfg.distill.group_ranks), backend=backend)
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
        if self.merge:
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
        grad = res.grad_images if self.merge else \
            res.grad_images[self.synset.is_distilled.to(res.grad_images.device)]
        self._check_finite(iteration, res.loss, grad, res.grad_lr)
        self.opt_images.zero_grad(set_to_none=False)
        self.opt_lr.zero_grad(set_to_none=False)
        self.synset.distilled.grad = grad.reshape(self.synset.distilled.shape).clone()
        self.synset.syn_lr.grad = res.grad_lr.reshape(()).clone()
        lr_before = float(self.synset.syn_lr.detach())
        self.opt_images.step()
        self.opt_lr.step()
        self._check_lr(iteration, lr_before)
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

    def _check_lr(self, iteration: int, before: float) -> None:
        """Stop when the learned student learning rate turned non-positive or moved by more
        than ``distill.max_lr_change`` of itself in one update: the images that follow are
        trained by a student that climbs its loss (or by an lr that jumped), and the image guards
        would only notice later, naming the wrong quantity. Says which ``distill.lr_lr`` would
        have kept the update within the bound (the update is lr_lr times the optimiser's step
        direction, which includes momentum)."""
        d = self.cfg.distill
        after = float(self.synset.syn_lr.detach())
        bound = d.max_lr_change
        if after > 0 and (bound is None or abs(after - before) <= bound * abs(before)):
            return
        state = self.opt_lr.state.get(self.synset.syn_lr, {})
        step = state.get("momentum_buffer")
        direction = abs(float(step if step is not None else self.synset.syn_lr.grad))
        allowed = (bound if bound is not None else 1.0) * abs(before)
        fits = _round_down(allowed / direction) if direction > 0 else None
        what = "became non-positive" if after <= 0 else \
            f"changed by {abs(after - before) / abs(before):.0%} of itself (more than " \
            f"distill.max_lr_change = {bound:g})"
        hint = (f"set distill.lr_lr to {fits:g} or less (now {d.lr_lr:g}): the update moved it "
                f"by {abs(after - before):.3g} along a step direction of {direction:.3g}"
                if fits is not None else f"lower distill.lr_lr (now {d.lr_lr:g})")
        raise DivergenceError(
            f"the learned student learning rate syn_lr {what} at iteration {iteration}: "
            f"{before:.4g} -> {after:.4g}; the last good checkpoint is kept. To continue, {hint}")

    def _check_blowup(self, iteration: int, loss: float) -> None:
        """Stop a run that has blown up while staying finite (e.g. ``distill.lr_images 1e12``:
        pixels near 1e9 that evaluate at chance). Runs before the iteration's checkpoint, so the
        checkpoint on disk is always the last state that passed."""
        d = self.cfg.distill
        # the learned learning rate has its own guard (_check_lr): what diverges here is images
        keep = (f"the last good checkpoint is kept. Lower distill.lr_images (now "
                f"{d.lr_images:g})")
        if d.max_image_ratio is not None and len(self.synset.distilled):
            peak = float(self.synset.distilled.detach().abs().max())
            if peak > d.max_image_ratio * self.real_abs_max:
                raise DivergenceError(
                    f"the learnable images diverged at iteration {iteration}: one reaches "
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
            "method": self.name,
            "stamp": self.resume_key,
            "made_of": self.made_of,
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
        if state.get("stamp") != self.resume_key:
            raise StaleCheckpointError(
                f"{url} was written with other settings, experts, scores or start (only "
                f"distill.iterations, checkpoint_every, log_every, check_every and num_threads "
                f"may change on --resume); run without --resume to start over")
        check_checkpoint(state, url, self.synset)
        if not torch.equal(state["source_index"], self.synset.source_index.cpu()):
            raise StaleCheckpointError(f"{url}: its synthetic set was selected from other images "
                                       f"(other scores or selection); run without --resume to "
                                       f"start over")
        if state["iteration"] > self.cfg.distill.iterations:
            raise StaleCheckpointError(
                f"{url} is at iteration {state['iteration']}, past distill.iterations = "
                f"{self.cfg.distill.iterations}: a shorter run cannot continue from it; run "
                f"without --resume to start over")
        with torch.no_grad():
            self.synset.distilled.copy_(state["distilled"].to(self.synset.distilled))
            self.synset.syn_lr.copy_(state["syn_lr"].to(self.synset.syn_lr))
        self.opt_images.load_state_dict(state["opt_images"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])


def initial_set(cfg: RunConfig, ds: Dataset, start: Start | None = None,
                scores: Scores | None = None, pool: np.ndarray | None = None) -> SyntheticSet:
    """The selection ``start`` makes at ``cfg``'s IPC and α as a synthetic set (float32, CPU):
    D_select the harder part, D_distill the easier. ``start``: default the config's own (a
    pinned start: select.init random or topk, or select.beta set); ``scores``: default read from
    ``cfg.run_dir`` where the start needs them. ``pool``: select among these training indices
    only (an α trial's pool: distill/search.py)."""
    if start is None:
        start = resolve_start(cfg.select.init, cfg.select.beta, None)
    if scores is None and needs_scores(start.init, cfg.distill.alpha):
        kind = cfg.scores.topk if start.init == "topk" else cfg.scores.kind
        scores = load_scores(cfg.run_dir, kind)
    sel = make_selection(start.init, scores=scores, labels=ds.y_train.numpy(),
                         num_classes=ds.info.num_classes, ipc=cfg.select.ipc, beta=start.beta,
                         alpha=cfg.distill.alpha, seed=cfg.seed, pool=pool)
    return SyntheticSet.from_selection(sel, ds.x_train, syn_lr_init(cfg))
