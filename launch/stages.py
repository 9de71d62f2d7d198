"""The stages of ``selmatch run`` (and of the stand-alone commands), each skipped when fresh.

Every stage follows the one rule of distill/freshness.py: compute the stamp of what would make the
artifact now (its config fields and the digests of what it reads), compare with the stamp stored
beside the artifact, reuse on equality and redo otherwise. A distillation that is stale only
because it should run longer continues from its checkpoint.

Repetitions: ``rep`` is the config of one repetition seed (``seed`` = that seed, ``run_dir`` = its
directory); ``base`` is the run itself, owner of the experts, the scores
and the window search, which all repetitions share (distill.config_io.repetitions).
"""

from __future__ import annotations

import logging

from distill import storage
from distill.augment import REAL_PARTS
from distill.baselines import baseline_set
from distill.config import RunConfig
from distill.data import Dataset
from distill.distiller import result_stamp, run_distill
from distill.evaluate import ImageSet, Reference
from distill.experts import expert_network
from distill.freshness import is_fresh, stamp
from distill.methods import METHODS, augment_for, crop_fill_for, distill_config, eval_network, flip_for
from distill.report import write_eval_metrics
from distill.runtime import device_for
from distill.scores import load_scores, scores_digest, scores_exist
from distill.search import window_search
from distill.synset import load_synset
from distill.trajectories import ExpertStore
from launch.evaluate import evaluate_sets
from launch.scores import topk_config

log = logging.getLogger(__name__)


def _synset_url(run_dir: str, name: str) -> str:
    return storage.join(run_dir, "synset", f"{name}.pt")


def _stored_stamp(url: str) -> str | None:
    """The stamp recorded in a synset file's meta (None when absent or unreadable)."""
    if not storage.exists(url):
        return None
    try:
        return storage.torch_load(url).get("meta", {}).get("stamp")
    except ValueError:  # damaged: redo it
        return None


# --------------------------------------------------------------------------------------------
# Window search (once per run, base seed)
# --------------------------------------------------------------------------------------------


def _real_rows(cfg: RunConfig, augment: str) -> dict:
    """How real rows are cropped and flipped, for the stamps of the augmentations that have such
    a part (distill/freshness.py leaves eval.flip and eval.crop_fill out of the stage fields)."""
    if augment not in REAL_PARTS:
        return {}
    return {"flip": flip_for(cfg), "crop_fill": crop_fill_for(cfg)}


def _topk_scores(base: RunConfig):
    """The top-k row's scores when they differ from the windows' and exist (the window search
    scores them as a reference point), else None."""
    tk = topk_config(base)
    if tk.scores.kind == base.scores.kind or not scores_exist(base.run_dir, tk.scores.kind):
        return None, None
    return load_scores(base.run_dir, tk.scores.kind), scores_digest(base.run_dir, tk.scores.kind)


def stage_window(base: RunConfig, ds: Dataset) -> dict:
    url = storage.join(base.run_dir, "window", "results.json")
    topk, topk_digest = _topk_scores(base)
    inputs = {"scores": scores_digest(base.run_dir, base.scores.kind)}
    if topk_digest is not None:
        inputs["topk_scores"] = topk_digest
    augment = augment_for("window", base)
    want = stamp(base, "window", inputs=inputs,
                 extra={"augment": augment, **_real_rows(base, augment),
                        "search": "distill.search v1"})
    if storage.exists(url) and is_fresh(storage.read_json(url).get("stamp"), want):
        log.info("window search: present and fresh, skipped")
        return storage.read_json(url)
    result = window_search(base, ds, load_scores(base.run_dir, base.scores.kind),
                           topk_scores=topk, device=device_for())
    result["stamp"] = want
    storage.write_json(url, result)
    log.info("window search on %d validation images: chose beta %.3g (validation accuracy %s)",
             result["validation_size"], result["best_beta"],
             ", ".join(f"{a:.3f}" for a in result["val_accuracy"]))
    for w in result["decision"]["warnings"]:
        log.warning("window search: %s", w)
    return result


# --------------------------------------------------------------------------------------------
# Synthetic sets of one repetition
# --------------------------------------------------------------------------------------------


def stage_selection(rep: RunConfig, base: RunConfig, name: str, ds: Dataset,
                    best_beta: float | None) -> None:
    """A selection row's set (random, topk, window at the best β, init) in the repetition."""
    scores_cfg = topk_config(base) if name == "topk" else base
    scores = None
    inputs: dict[str, str] = {}
    if name != "random":
        kind = scores_cfg.scores.kind
        inputs["scores"] = f"{kind}:{scores_digest(base.run_dir, kind)}"
        scores = load_scores(base.run_dir, kind)
    beta = best_beta if name == "window" else None
    want = stamp(rep, "selection", inputs=inputs, extra={"method": name, "beta": beta})
    url = _synset_url(rep.run_dir, name)
    if is_fresh(_stored_stamp(url), want):
        log.info("selection %s (seed %d): present and fresh, skipped", name, rep.seed)
        return
    synset = baseline_set(name, rep, ds, scores, beta)
    meta = {"method": name, "ipc": rep.select.ipc, "beta": beta if name == "window" else
            (rep.select.beta if name == "init" else None), "seed": rep.seed, "stamp": want,
            "score": scores.kind if scores is not None else None}
    synset.save(rep.run_dir, name, meta=meta, denormalize=ds.denormalize)


def stage_distill(rep: RunConfig, base: RunConfig, synset: str) -> None:
    """A distilled set (selmatch, mtt, init_full, merge) in the repetition: skipped when fresh,
    continued from its checkpoint when only the iteration count grew, redone otherwise."""
    cfg = distill_config(rep, synset)
    url = _synset_url(rep.run_dir, synset)
    if is_fresh(_stored_stamp(url), result_stamp(cfg, base)):
        log.info("distill %s (seed %d): present and fresh, skipped", synset, rep.seed)
        return
    run_distill(cfg, resume=True, restart_stale=True, source=base, method=synset)


# --------------------------------------------------------------------------------------------
# Evaluation of one row in one repetition
# --------------------------------------------------------------------------------------------


class ReferenceCache:
    """The easy/hard split and feature space from the run's first expert, built on first use."""

    def __init__(self, base: RunConfig, ds: Dataset):
        self.base, self.ds, self._ref = base, ds, None

    def get(self) -> Reference:
        if self._ref is None:
            store = ExpertStore(self.base)
            expert = store.load(store.require(deep=False)[0])
            net = expert_network(self.base, self.ds, expert, device=device_for())
            self._ref = Reference.from_expert(net, self.ds)
        return self._ref


def stage_evaluate(items: list[tuple[RunConfig, str]], base: RunConfig, ds: Dataset,
                   reference: ReferenceCache, *, workers: int | None = 0,
                   ray_address: str | None = None) -> dict[tuple[int, str], dict]:
    """``eval/<name>.json`` of each (repetition, row): the row's set trained with its
    augmentation. The rows whose result is missing or stale go out together: every run of every
    one is an independent job (launch/evaluate.py: Ray tasks, or in-process with
    ``workers=0``), so where they run does not change them."""
    records, stale = {}, {}
    for rep, name in items:
        method = METHODS[name]
        synset_url = _synset_url(rep.run_dir, method.synset)
        out = storage.join(rep.run_dir, "eval", f"{name}.json")
        augment = augment_for(name, rep)
        want = stamp(rep, "evaluate", inputs={"synset": storage.sha256(synset_url)[:16],
                                              "reference": ExpertStore(base).digest()},
                     extra={"augment": augment, **_real_rows(rep, augment),
                            "network": eval_network(rep)})
        if storage.exists(out):
            record = storage.read_json(out)
            if is_fresh(record.get("stamp"), want):
                log.info("evaluate %s (seed %d): present and fresh, skipped", name, rep.seed)
                records[rep.seed, name] = record
                continue
        synset, state = load_synset(rep.run_dir, method.synset)
        stale[rep.seed, name] = (rep, synset, state.get("meta", {}), want, out, augment)
    if stale:
        sets = {key: ImageSet(synset.images().detach(), synset.labels, synset.is_distilled,
                              augment=augment, seed=rep.seed)
                for key, (rep, synset, _, _, _, augment) in stale.items()}
        results = evaluate_sets(base, ds, sets, reference=reference.get(), workers=workers,
                                ray_address=ray_address)
        for key, res in results.items():
            rep, synset, meta, want, out, augment = stale[key]
            name = key[1]
            record = {**res.to_dict(), "method": name, "synset": METHODS[name].synset,
                      "seed": rep.seed, "stamp": want,
                      "n_distilled": int(synset.is_distilled.sum()), "score": meta.get("score"),
                      "iterations": meta.get("iterations"), "alpha": meta.get("alpha"),
                      "beta": meta.get("beta")}
            storage.write_json(out, record)
            log.info("evaluate %s (seed %d, %s): %.2f ± %.2f %% over %d runs", name, rep.seed,
                     augment, 100 * res.mean, 100 * res.std, res.runs)
            records[key] = record
    write_eval_metrics(base)  # logs/eval.jsonl (and TensorBoard): every seed, pooled as reported
    return records
