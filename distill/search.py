"""The α/β searches of App. E, scored on one validation split, with their noise. No Ray here.

    ctx = SearchContext(cfg, ds, scores)            # the split, once per run
    ctx.beta_point(0.3)                             # {"val_acc": ..., "correct": [...], ...}
    window_search(cfg, ds, scores)                  # every β of the grid (selmatch window/run)
    decide({b: point(r) for b, r in ...}, start=0.4, chance=ctx.chance, kind="beta")

``selmatch window`` (and ``selmatch run``) scores every β of the grid to draw the whole curve;
``selmatch tune`` hill-climbs the same grid (tune/) and distils α trials. Both score a β with
:meth:`SearchContext.beta_point`, so the same β on the same experts has the same validation
accuracy in both, and both choose with :func:`decide`.

Decisions:

* **One validation split, held out before any search.** ``tune.val_fraction`` of each class's
  training samples, drawn at random from (run seed, class), leave the selection pool before any
  candidate is made. Every candidate (each window β, the random reference point of
  the window search, each β and α trial of ``selmatch tune``) selects its images from the pool
  and is scored on all of the validation images: the same images for every candidate, none of
  them a training image of any candidate. A random split, not "the last 10%", because dataset
  order may carry structure. The final sets of a run still select from the whole training set,
  at the chosen values.
* **β keeps its meaning.** A window is taken in the pool's own difficulty order (the full order
  thinned by the split), so β is the same difficulty quantile as in the final run.
* **Common random numbers.** Every point trains ``tune.eval_runs`` networks seeded from (run
  seed, k), the same seeds for every point, for :func:`search_epochs` epochs (App. E: a fraction
  of the evaluation's), with the augmentation of the row it stands for (a β point: the window
  row's DSA; an α trial: SelMatch's combined). Two points differ only in their images.
* **Noise is part of the answer.** Each point keeps which validation images each of its networks
  got right, so two points are compared pairwise on the same images (:func:`difference`): the
  standard error of the accuracy difference over validation images, plus, with two or more runs
  per point, over training seeds. A value is *tied* with the best when the best's lead over it
  is at most :data:`Z` standard errors. :func:`decide` takes the best accuracy, and among the
  values tied with it the one nearest the search's start (``tune.beta_start`` /
  ``tune.alpha_start``, else the grid's middle; then the smaller): a search that cannot tell
  its points apart does not move the choice away from where it started. A tie, or a best point
  within noise of always guessing one class, is a warning in the log, in ``tune/selected.yaml``
  and in the report.
* **The random subset is a candidate start.** The window search (and ``selmatch tune``) also
  scores the random subset of the pool, like a β point; SelMatch starts from the chosen window
  only when it leads that subset beyond the noise (:func:`decide_start`), else from the random
  subset (same class balance, harder part real and easier part distilled as for a window).
  ``select.init`` / ``select.beta`` pin either start.
* **What is not held out.** The experts, and so the difficulty scores and the trajectories that
  α trials match, were trained on all training samples, validation part included. Retraining
  experts per split would cost more than the whole search; the leak is indirect (no validation
  image is a training image of a scored network) and the same for every candidate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.augment import has_real_part
from distill.config import RunConfig
from distill.data import Dataset
from distill.evaluate import ImageSet, config_epochs, run_jobs
from distill.methods import augment_for, flip_for
from distill.rng import VALIDATION_SPLIT
from distill.runtime import device_for
from distill.scores import Scores
from distill.selection import Selection, make_selection, window_fits, window_start

METRIC = "val_acc"
Z = 2.0
"""Standard errors by which the best point must lead another to count as better (about a 95%
two-sided interval for a normal difference)."""

RULE = ("highest validation accuracy; among the values whose difference from it is within "
        f"{Z:g} standard errors (paired over the same validation images and training seeds), "
        "the one nearest the search's start, then the smaller")

_DECIMALS = 10  # grid values are rounded so that 3 * 0.1 prints (and compares) as 0.3


# --------------------------------------------------------------------------------------------
# Grids, short training, the validation split
# --------------------------------------------------------------------------------------------


def make_grid(lo: float, hi: float, step: float, *, bound: float | None = None) -> list[float]:
    """``lo, lo + step, ...`` up to ``hi`` (inclusive, within float tolerance), then only the
    values ``<= bound`` when a bound is given (the optimum of an earlier, smaller IPC)."""
    if not step > 0:
        raise ValueError(f"grid step must be > 0, got {step!r}")
    if hi < lo:
        raise ValueError(f"grid upper end {hi:g} is below its lower end {lo:g}")
    count = int(math.floor((hi - lo) / step + 1e-9)) + 1
    grid = [round(lo + k * step, _DECIMALS) for k in range(count)]
    if bound is not None:
        grid = [v for v in grid if v <= bound + 1e-9]
        if not grid:
            raise ValueError(f"no grid value from {lo:g} in steps of {step:g} is <= the bound "
                             f"{bound:g}")
    return grid


def beta_grid(step: float, ipc: int, min_class_size: int) -> list[float]:
    """β = 0, step, 2·step, … while the window still fits in the smallest class."""
    return [b for b in make_grid(0.0, 1.0, step) if b < 1 and window_fits(b, ipc, min_class_size)]


def grid_start(grid: list[float], start: float | None) -> float:
    """Where a search over ``grid`` starts: the grid value nearest ``start``, else the middle
    (the lower of the two middles); the hill-climb (tune/search.py) uses the same rule."""
    if start is None:
        return grid[(len(grid) - 1) // 2]
    return min(grid, key=lambda v: (abs(v - start), v))


def epoch_fraction(cfg: RunConfig, kind: str = "beta") -> float:
    """Share of the evaluation epochs a search candidate trains for: ``tune.beta_epoch_fraction``,
    else App. E's 20% for CIFAR-10 and 10% otherwise; an α trial (``kind`` alpha) takes
    ``tune.alpha_epoch_fraction`` when set, else the same."""
    if kind == "alpha" and cfg.tune.alpha_epoch_fraction is not None:
        return cfg.tune.alpha_epoch_fraction
    if cfg.tune.beta_epoch_fraction is not None:
        return cfg.tune.beta_epoch_fraction
    return 0.2 if cfg.data.name == "cifar10" else 0.1


def search_epochs(cfg: RunConfig, n_images: int, n_train: int, kind: str = "beta") -> int:
    """Epochs of a search candidate: :func:`epoch_fraction` of what the final evaluation of
    ``n_images`` images would use (``eval.epochs`` or the ratio rule), rounded half up, >= 1."""
    full = config_epochs(cfg.eval, min(n_images, n_train), n_train)
    return max(1, math.floor(full * epoch_fraction(cfg, kind) + 0.5))


def validation_index(ds: Dataset, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """A fixed ``fraction`` of each class's training samples (sorted dataset indices)."""
    labels = ds.y_train.numpy()
    out = []
    for c in range(ds.info.num_classes):
        idx = np.flatnonzero(labels == c)
        perm = torch.randperm(len(idx), generator=VALIDATION_SPLIT.generator(seed, c)).numpy()
        out.append(idx[perm[:max(1, int(round(fraction * len(idx))))]])
    return np.sort(np.concatenate(out))


def validation_split(ds: Dataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, validation): sorted training indices; the validation rows are
    :func:`validation_index`'s (per class round(fraction * n_c), at least one, drawn from
    (seed, class)), the pool is the rest, and every class keeps at least one sample in it."""
    if not 0 < fraction < 1:
        raise ValueError(f"tune.val_fraction must be in (0, 1), got {fraction!r}")
    val = validation_index(ds, fraction=fraction, seed=seed)
    counts = np.bincount(ds.y_train.numpy(), minlength=ds.num_classes)
    left = counts - np.bincount(ds.y_train[val].numpy(), minlength=ds.num_classes)
    if (left < 1).any():
        raise ValueError(f"tune.val_fraction {fraction:g} leaves no training sample in class "
                         f"{int(np.argmin(left))} ({int(counts.min())} samples)")
    return np.setdiff1d(np.arange(len(ds.y_train)), val), val


def validation_dataset(ds: Dataset, val_index: np.ndarray) -> Dataset:
    """``ds`` whose test set is the validation rows (what a search scores on)."""
    return dataclasses.replace(ds, x_test=ds.x_train[val_index], y_test=ds.y_train[val_index])


# --------------------------------------------------------------------------------------------
# A scored point and the comparison of two
# --------------------------------------------------------------------------------------------


def _pack(correct: torch.Tensor) -> str:
    return np.packbits(correct.numpy().astype(np.uint8)).tobytes().hex()


def _unpack(text: str, n: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


@dataclass(frozen=True)
class Point:
    """One scored candidate: which validation images each of its networks got right."""

    correct: torch.Tensor  # bool [runs, n_val]

    @property
    def acc(self) -> float:
        return float(self.correct.float().mean())

    @property
    def run_accs(self) -> list[float]:
        return [float(a) for a in self.correct.float().mean(1)]

    def record(self) -> dict:
        """JSON fields of a trial record / results file (the metric, runs, packed images)."""
        return {METRIC: self.acc, "val_runs": self.run_accs, "n_val": int(self.correct.shape[1]),
                "correct": ";".join(_pack(row) for row in self.correct)}  # one string per point

    @classmethod
    def from_record(cls, rec: dict) -> Point | None:
        """The point of a record written by :meth:`record` (or a trial record holding its
        fields); None for a failed trial or one recorded without its images."""
        if rec.get("status", "ok") != "ok" or not rec.get("correct") or "n_val" not in rec:
            return None
        return cls(torch.stack([_unpack(t, int(rec["n_val"]))
                                for t in rec["correct"].split(";")]))


def difference(a: Point, b: Point) -> tuple[float, float]:
    """(accuracy of ``a`` − accuracy of ``b``, its standard error), paired: both were scored on
    the same validation images with networks of the same seeds. The variance adds the spread
    over images of the per-image difference and, with two or more runs, the spread over runs of
    the per-run difference (conservative: each partly contains the other)."""
    if a.correct.shape != b.correct.shape:
        raise ValueError(f"points scored on different validation sets or run counts: "
                         f"{tuple(a.correct.shape)} vs {tuple(b.correct.shape)}")
    ca, cb = a.correct.double(), b.correct.double()
    per_image = ca.mean(0) - cb.mean(0)
    n, runs = per_image.numel(), ca.shape[0]
    var = float(per_image.var()) / n if n > 1 else 0.0
    if runs > 1:
        var += float((ca.mean(1) - cb.mean(1)).var()) / runs
    return float(per_image.mean()), math.sqrt(var)


CHANCE_MARGIN = 0.1
"""Share of the way from chance to 100% within which a network counts as having learned next to
nothing, however many samples measured it."""


def at_chance(acc: float, chance: float, n: int | None = None) -> bool:
    """Whether accuracy ``acc`` (over ``n`` samples; None: unknown) is no better than always
    guessing the largest class (accuracy ``chance``): within :data:`Z` binomial standard errors
    of it, or within :data:`CHANCE_MARGIN` of the way from it to 100%. The one rule for a search
    point and for an expert."""
    noise = Z * math.sqrt(chance * (1 - chance) / n) if n else 0.0
    return acc <= chance + max(noise, CHANCE_MARGIN * (1 - chance))


@dataclass
class Decision:
    """What a search chose and how sure it is."""

    kind: str                      # beta or alpha
    value: float                   # the chosen value
    metric: float                  # its validation accuracy
    best: float                    # the value with the highest accuracy
    start: float                   # the search's start (the tie rule's anchor)
    tied: list[float]              # values within noise of the best (best included), sorted
    leads: dict[str, list[float]] = field(default_factory=dict)  # value -> [best − it, se]
    warnings: list[str] = field(default_factory=list)
    rule: str = RULE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def decide(points: dict[float, Point | None], *, start: float, chance: float,
           kind: str) -> Decision:
    """Choose among scored values (None = a failed trial) by :data:`RULE`, with the warnings."""
    ok = {v: p for v, p in points.items() if p is not None}
    if not ok:
        raise ValueError(f"no {kind} value was scored")
    best = max(ok, key=lambda v: (ok[v].acc, -abs(v - start), -v))
    leads = {v: difference(ok[best], ok[v]) for v in ok if v != best}
    tied = sorted([best] + [v for v, (d, se) in leads.items() if d <= Z * se])
    value = min(tied, key=lambda v: (abs(v - start), v))
    warnings = []
    if at_chance(ok[best].acc, chance, ok[best].correct.numel()):
        warnings.append(
            f"{kind} search at chance: the best validation accuracy {100 * ok[best].acc:.1f}% is "
            f"within noise of always guessing one class ({100 * chance:.1f}%): its networks "
            f"learned nothing that tells the values apart; train them longer "
            f"(eval.epochs, tune.{kind}_epoch_fraction)")
    if len(tied) > 1:
        others = ", ".join(f"{v:g} ({100 * ok[v].acc:.1f}%)" for v in tied if v != best)
        warnings.append(
            f"{kind} = {best:g} scored best ({100 * ok[best].acc:.1f}%) but is not better than "
            f"{others} beyond the noise ({Z:g} standard errors of the paired difference); "
            f"{kind} = {value:g} chosen by the tie rule (nearest the search's start {start:g})")
    return Decision(kind=kind, value=value, metric=ok[value].acc, best=best, start=start,
                    tied=tied, leads={f"{v:g}": [d, se] for v, (d, se) in leads.items()},
                    warnings=warnings)


# --------------------------------------------------------------------------------------------
# Scoring candidates
# --------------------------------------------------------------------------------------------


def feasible_beta(beta: float, *, ipc: int, pool_sizes: list[int], min_class_size: int) -> bool:
    """The window fits in every class's pool, and the value is valid for the final config
    (``select.beta + select.ipc / smallest class <= 1``, as distill.validation checks)."""
    if not 0 <= beta < 1 or not window_fits(beta, ipc, min_class_size):
        return False
    return all(window_start(n, beta) + ipc <= n for n in pool_sizes)


class SearchContext:
    """What every candidate of one run's searches shares: config, data, scores, the split."""

    def __init__(self, cfg: RunConfig, ds: Dataset, scores: Scores, *,
                 device: str | None = None):
        self.cfg, self.ds, self.scores = cfg, ds, scores
        self._device = device
        labels = ds.y_train.numpy()
        self.labels = labels
        self.pool, self.val = validation_split(ds, cfg.tune.val_fraction, cfg.seed)
        self.val_ds = validation_dataset(ds, self.val)
        self.pool_sizes = [int((labels[self.pool] == c).sum()) for c in range(ds.num_classes)]
        val_counts = np.bincount(labels[self.val], minlength=ds.num_classes)
        self.chance = float(val_counts.max()) / len(self.val)

    @property
    def device(self) -> str:
        """Decided where the candidate runs (a Ray worker may have a GPU that the driver lacks)."""
        return self._device or device_for(self.cfg.tune.num_gpus)

    def describe(self) -> dict:
        """The split, for results files, ``selected.yaml`` and the report."""
        return {"validation_size": int(len(self.val)), "validation_seed": self.cfg.seed,
                "validation_fraction": self.cfg.tune.val_fraction,
                "pool_size": int(len(self.pool)), "chance": self.chance,
                "runs_per_point": self.cfg.tune.eval_runs}

    def beta_values(self) -> list[float]:
        """Grid values of β from 0 in steps of tune.beta_step whose window fits every class's
        pool (before any bound)."""
        smallest = int(np.bincount(self.labels, minlength=self.ds.num_classes).min())
        return [b for b in beta_grid(self.cfg.tune.beta_step, self.cfg.select.ipc, smallest)
                if feasible_beta(b, ipc=self.cfg.select.ipc, pool_sizes=self.pool_sizes,
                                 min_class_size=smallest)]

    def selection(self, beta: float | None, alpha: float, init: str = "window") -> Selection:
        """A selection made inside the pool (indices refer to the whole training set)."""
        return make_selection(init, scores=self.scores, labels=self.labels,
                              num_classes=self.ds.num_classes, ipc=self.cfg.select.ipc,
                              beta=beta, alpha=alpha, seed=self.cfg.seed, pool=self.pool)

    def score(self, images: torch.Tensor, labels: torch.Tensor, is_distilled: torch.Tensor,
              kind: str, *, seed: int | None = None) -> dict:
        """Train ``tune.eval_runs`` networks on the images (seeded from the run seed, or
        ``seed``) and score them on the validation images; the record of a :class:`Point` plus
        how it was trained."""
        cfg = self.cfg
        epochs = search_epochs(cfg, len(images), len(self.ds.y_train), kind)
        augment = augment_for("window" if kind == "beta" else "selmatch", cfg)
        sets = {"candidate": ImageSet(images, labels, is_distilled, augment=augment,
                                      seed=cfg.seed if seed is None else seed)}
        jobs = [("candidate", k, epochs) for k in range(cfg.tune.eval_runs)]
        done = run_jobs(cfg, self.val_ds, sets, jobs, device=self.device)
        point = Point(torch.stack([done["candidate", k] for k in range(cfg.tune.eval_runs)]))
        return {**point.record(), "epochs": epochs, "n_images": len(images),
                "augment": augment, "flip": flip_for(cfg) if has_real_part(augment) else None}

    def _score_selection(self, sel: Selection, kind: str) -> dict:
        x = self.ds.x_train[sel.source_index]
        return self.score(x, sel.labels, sel.is_distilled, kind)

    def beta_point(self, beta: float) -> dict:
        """The window at β inside the pool (real images only, α = 0), scored."""
        return self._score_selection(self.selection(beta, 0.0), "beta")

    def reference_point(self, init: str) -> dict:
        """A selection baseline (the random subset) inside the pool, scored like a β point:
        what a window must beat to be SelMatch's start."""
        return self._score_selection(self.selection(None, 0.0, init=init), "beta")


def decide_start(window: Point, random: Point, beta: float) -> dict:
    """SelMatch's start from the chosen window (at ``beta``) and the random subset of the same
    pool, scored alike: the window when it leads the random subset by more than :data:`Z`
    standard errors of their paired difference, else the random subset (a window that cannot be
    told apart from random images earns no place as the start). The same rule for
    ``selmatch window`` and ``selmatch tune``."""
    lead, se = difference(window, random)
    beats = lead > Z * se
    verdict = "beats" if beats else "does not beat"
    why = (f"the window at β = {beta:g} ({100 * window.acc:.1f}%) {verdict} the random subset "
           f"({100 * random.acc:.1f}%) beyond the noise: lead {100 * lead:.1f} points, "
           f"{Z:g} standard errors = {100 * Z * se:.1f}")
    return {"init": "window" if beats else "random", "beta": beta if beats else None,
            "lead": lead, "se": se, "why": why}


def window_search(cfg: RunConfig, ds: Dataset, scores: Scores, *, device: str | None = None,
                  progress: bool = True) -> dict:
    """Every β of the grid and the random reference scored on the validation split; the choice
    of :func:`decide` (``best_beta``) and SelMatch's start (:func:`decide_start`)."""
    ctx = SearchContext(cfg, ds, scores, device=device)
    betas = ctx.beta_values()
    if not betas:
        raise ValueError(f"no β in steps of tune.beta_step {cfg.tune.beta_step:g} fits "
                         f"select.ipc {cfg.select.ipc} in the class pools {ctx.pool_sizes}")
    records = {}
    for beta in tqdm(betas, desc="window search", disable=not progress):
        records[beta] = ctx.beta_point(beta)
    references = {"random": ctx.reference_point("random")}
    points = {b: Point.from_record(r) for b, r in records.items()}
    decision = decide(points, start=grid_start(betas, cfg.tune.beta_start), chance=ctx.chance,
                      kind="beta")
    best = points[decision.best]
    for rec in references.values():
        lead, se = difference(best, Point.from_record(rec))
        rec.update(best_minus_this=lead, se=se)
    start = decide_start(points[decision.value], Point.from_record(references["random"]),
                         decision.value)
    first = records[betas[0]]
    return {"betas": betas, "val_accuracy": [records[b][METRIC] for b in betas],
            "points": {f"{b:g}": records[b] for b in betas}, "references": references,
            "decision": decision.to_dict(), "best_beta": decision.value, "start": start,
            "epochs": first["epochs"],
            "full_epochs": config_epochs(cfg.eval, cfg.select.ipc * ds.info.num_classes,
                                         len(ds.y_train)),
            "metric": "validation accuracy", "augment": first["augment"], **ctx.describe()}
