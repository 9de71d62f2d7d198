"""The makers of ``selmatch run``'s artifacts (and of the stand-alone commands'), each asking
distill/freshness.py whether its artifact is fresh and making it only when it is not.

Each maker writes its artifact with the stamp of what made it (``stamp``, ``made_of``: the
stage table's fields, the digests of its inputs, its kind, role and version), so the next
command's question has an answer. A distillation that is stale only because it should run
longer continues from its checkpoint (launch/distillation.py).
"""

from __future__ import annotations

import logging

from distill import integrity
from distill.artifacts import Ref, digest
from distill.data import Dataset
from distill.evaluate import ImageSet, Reference
from distill.experts import expert_network
from distill.freshness import Freshness, url_of
from distill.methods import METHODS, augment_for, eval_network
from distill.report import write_eval_metrics
from distill.runtime import device_for
from distill.baselines import baseline_set
from distill.scores import load_scores
from distill.search import window_search
from distill.selection import needs_scores
from distill.synset import load_synset
from distill.trajectories import ExpertStore
from launch.distillation import distill_set
from launch.evaluate import evaluate_sets
from launch.scores import topk_config

log = logging.getLogger(__name__)


def _skip(check: Freshness, ref: Ref) -> bool:
    """Whether ``ref`` is fresh (logged); a damaged or stale one is logged with why."""
    status = check.status(ref)
    if status.fresh:
        log.info("%s: present and fresh, skipped", ref)
        return True
    if status.damaged:
        log.warning("%s: making it again", status.why)
    elif not status.missing:
        log.info("%s: making it again: %s", ref, status.why)
    return False


# --------------------------------------------------------------------------------------------
# Window search (once per run, base seed)
# --------------------------------------------------------------------------------------------


def stage_window(check: Freshness, ds: Dataset) -> dict:
    """``window/results.json``: every β of the grid and the random subset scored on the
    validation split, the best β and SelMatch's start."""
    ref = Ref("window")
    if not _skip(check, ref):
        base = check.cfg
        result = window_search(base, ds, load_scores(base.run_dir, base.scores.kind),
                               device=device_for())
        made = check.wanted(ref)
        result.update(stamp=digest(made), made_of=made)
        integrity.write_json(url_of(base, ref), result)
        check.forget()
        log.info("window search on %d validation images: chose beta %.3g (validation accuracy "
                 "%s); SelMatch's start: %s", result["validation_size"], result["best_beta"],
                 ", ".join(f"{a:.3f}" for a in result["val_accuracy"]), result["start"]["why"])
        for w in result["decision"]["warnings"]:
            log.warning("window search: %s", w)
    return check.window()


# --------------------------------------------------------------------------------------------
# Synthetic sets of one repetition
# --------------------------------------------------------------------------------------------


def stage_selection(check: Freshness, ref: Ref, ds: Dataset) -> None:
    """A selection row's set (random, topk, window at the best β, SelMatch's start alone)."""
    if _skip(check, ref):
        return
    rep = check.rep(ref)
    start = check.start_of(ref)
    scores = None
    if needs_scores(start.init, 0.0):
        cfg = topk_config(check.cfg) if start.init == "topk" else check.cfg
        scores = load_scores(check.cfg.run_dir, cfg.scores.kind)
    made = check.wanted(ref)
    meta = {"method": ref.name, "artifact": "selection", "ipc": rep.select.ipc,
            "start": start.to_dict(), "beta": start.beta, "init": start.init, "alpha": 0.0,
            "alpha_source": "the row", "seed": rep.seed, "stamp": digest(made),
            "made_of": made, "score": scores.kind if scores is not None else None}
    baseline_set(rep, ds, start, scores).save(rep.run_dir, ref.name, meta=meta, dataset=ds)
    check.forget()


def stage_distill(check: Freshness, ref: Ref, ds: Dataset) -> None:
    """A distilled set of a repetition: skipped when fresh, continued from its checkpoint when
    only the iteration count grew, redone otherwise."""
    if _skip(check, ref):
        return
    distill_set(check.cfg, ref.name, seed=ref.seed, resume=True, restart_stale=True, ds=ds,
                check=check)
    check.forget()


# --------------------------------------------------------------------------------------------
# Evaluation of rows
# --------------------------------------------------------------------------------------------


class ReferenceCache:
    """The easy/hard split and feature space from the run's first expert, built on first use."""

    def __init__(self, check: Freshness, ds: Dataset):
        self.check, self.ds, self._ref = check, ds, None

    def get(self) -> Reference:
        if self._ref is None:
            base = self.check.cfg
            store = ExpertStore(base)
            expert = store.load(store.require(deep=False)[0])
            net = expert_network(base, self.ds, expert, device=device_for())
            self._ref = Reference.from_expert(net, self.ds)
        return self._ref


def stage_evaluate(check: Freshness, refs: list[Ref], ds: Dataset, reference: ReferenceCache,
                   *, workers: int | None = 0, ray_address: str | None = None) -> None:
    """``eval/<row>.json`` of each evaluation in ``refs``: the row's set trained with its
    augmentation. The stale ones go out together: every run of every one is an independent job
    (launch/evaluate.py: Ray tasks, or in-process with ``workers=0``), so where they run does
    not change them."""
    base = check.cfg
    stale = {}
    for ref in refs:
        if _skip(check, ref):
            continue
        rep = check.rep(ref)
        synset, state = load_synset(rep.run_dir, METHODS[ref.name].synset,
                                    image_shape=ds.image_shape, num_classes=ds.num_classes)
        stale[ref] = (rep, synset, state.get("meta", {}), check.wanted(ref))
    if stale:
        sets = {ref: ImageSet(synset.images().detach(), synset.labels, synset.is_distilled,
                              augment=augment_for(ref.name, rep), seed=rep.seed)
                for ref, (rep, synset, _, _) in stale.items()}
        results = evaluate_sets(base, ds, sets, reference=reference.get(), workers=workers,
                                ray_address=ray_address)
        for ref, res in results.items():
            rep, synset, meta, made = stale[ref]
            record = {**res.to_dict(), "method": ref.name, "synset": METHODS[ref.name].synset,
                      "seed": rep.seed, "stamp": digest(made), "made_of": made,
                      "n_distilled": int(synset.is_distilled.sum()), "score": meta.get("score"),
                      "iterations": meta.get("iterations"), "alpha": meta.get("alpha"),
                      "alpha_source": meta.get("alpha_source"), "beta": meta.get("beta"),
                      "start": meta.get("start"), "network": eval_network(rep)}
            integrity.write_json(url_of(base, ref), record)
            log.info("evaluate %s: %.2f ± %.2f %% over %d runs (%s)", ref, 100 * res.mean,
                     100 * res.std, res.runs, res.augment)
        check.forget()
        write_eval_metrics(base)  # logs/eval.jsonl (and TensorBoard): every seed, pooled

