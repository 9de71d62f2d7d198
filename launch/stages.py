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

from distill import integrity, storage
from distill.augment import REAL_PARTS
from distill.baselines import baseline_set
from distill.config import RunConfig
from distill.data import Dataset
from distill.distiller import result_made_of, result_stamp, run_distill
from distill.evaluate import ImageSet, Reference
from distill.experts import expert_network
from distill.freshness import digest, explain, is_fresh, made_of, stamp
from distill.integrity import DamagedArtifactError
from distill.methods import (
    DISTILLED,
    METHODS,
    augment_for,
    crop_fill_for,
    distill_config,
    eval_network,
    flip_for,
)
from distill.report import write_eval_metrics
from distill.runtime import device_for
from distill.scores import load_scores, scores_digest, scores_exist
from distill.search import window_search
from distill.synset import load_synset, read_synset_state
from distill.trajectories import ExpertStore
from launch.evaluate import evaluate_sets
from launch.scores import topk_config

log = logging.getLogger(__name__)


def _synset_url(run_dir: str, name: str) -> str:
    return storage.join(run_dir, "synset", f"{name}.pt")


def stored_meta(url: str) -> dict | None:
    """The ``meta`` of a synset file (its stamp and what made it); None when absent, or damaged
    (logged: the owning stage then makes it again)."""
    if not storage.exists(url):
        return None
    try:
        return read_synset_state(url).get("meta", {})
    except DamagedArtifactError as err:
        log.warning("%s: making it again", err)
        return None


def _stored_stamp(url: str) -> str | None:
    meta = stored_meta(url)
    return None if meta is None else meta.get("stamp")


def _read_checked_json(url: str, what: str) -> dict | None:
    """A stage's own JSON result (verified); None when absent or damaged (logged: redone)."""
    if not storage.exists(url):
        return None
    try:
        return integrity.read_json(url, fix=f"the {what} is redone")
    except DamagedArtifactError as err:
        log.warning("%s", err)
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
    stored = _read_checked_json(url, "window search")
    if stored is not None and is_fresh(stored.get("stamp"), want):
        log.info("window search: present and fresh, skipped")
        return stored
    result = window_search(base, ds, load_scores(base.run_dir, base.scores.kind),
                           topk_scores=topk, device=device_for())
    result["stamp"] = want
    integrity.write_json(url, result)
    log.info("window search on %d validation images: chose beta %.3g (validation accuracy %s)",
             result["validation_size"], result["best_beta"],
             ", ".join(f"{a:.3f}" for a in result["val_accuracy"]))
    for w in result["decision"]["warnings"]:
        log.warning("window search: %s", w)
    return result


# --------------------------------------------------------------------------------------------
# Synthetic sets of one repetition
# --------------------------------------------------------------------------------------------


def selection_made_of(rep: RunConfig, base: RunConfig, name: str,
                      best_beta: float | None) -> dict:
    """What makes a selection row's set in repetition ``rep`` (freshness.made_of)."""
    inputs: dict[str, str] = {}
    if name != "random":
        kind = (topk_config(base) if name == "topk" else base).scores.kind
        inputs["scores"] = f"{kind}:{scores_digest(base.run_dir, kind)}"
    beta = best_beta if name == "window" else None
    return made_of(rep, "selection", inputs=inputs, extra={"method": name, "beta": beta})


def stage_selection(rep: RunConfig, base: RunConfig, name: str, ds: Dataset,
                    best_beta: float | None) -> None:
    """A selection row's set (random, topk, window at the best β, init) in the repetition."""
    made = selection_made_of(rep, base, name, best_beta)
    want = digest(made)
    url = _synset_url(rep.run_dir, name)
    if is_fresh(_stored_stamp(url), want):
        log.info("selection %s (seed %d): present and fresh, skipped", name, rep.seed)
        return
    scores = None
    if name != "random":
        scores = load_scores(base.run_dir, (topk_config(base) if name == "topk" else
                                            base).scores.kind)
    beta = best_beta if name == "window" else None
    synset = baseline_set(name, rep, ds, scores, beta)
    meta = {"method": name, "ipc": rep.select.ipc, "beta": beta if name == "window" else
            (rep.select.beta if name == "init" else None), "seed": rep.seed, "stamp": want,
            "made_of": made, "score": scores.kind if scores is not None else None}
    synset.save(rep.run_dir, name, meta=meta, denormalize=ds.denormalize)


def synset_made_of(rep: RunConfig, base: RunConfig, synset: str,
                   best_beta: float | None) -> dict:
    """What ``selmatch run`` would make ``synset`` of in repetition ``rep`` from now."""
    if synset in DISTILLED:
        return result_made_of(distill_config(rep, synset), base)
    return selection_made_of(rep, base, synset, best_beta)


class StaleSetError(ValueError):
    """Synthetic sets that are not what the config would make (``selmatch evaluate``)."""


def require_fresh_sets(cfg: RunConfig, synsets: list[str], best_beta: float | None) -> None:
    """The freshness rule of ``selmatch run`` applied to sets that a command only reads: every
    one must be what the config would make now, or a StaleSetError names each and what changed."""
    stale = []
    for name in synsets:
        url = _synset_url(cfg.run_dir, name)
        meta = read_synset_state(url).get("meta", {})  # damaged: an error naming the file
        want = synset_made_of(cfg, cfg, name, best_beta)
        if not is_fresh(meta.get("stamp"), digest(want)):
            stale.append(f"{url} ({explain(meta.get('made_of'), want)})")
    if stale:
        raise StaleSetError(
            f"{len(stale)} synthetic set(s) were made with other settings than this command's: "
            f"{'; '.join(stale)}. Make them again with `selmatch run` (or `selmatch distill`) "
            f"with the same --config and overrides, or evaluate with the settings they were "
            f"made with")


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
        record = _read_checked_json(out, f"evaluation of {name}")
        if record is not None and is_fresh(record.get("stamp"), want):
            log.info("evaluate %s (seed %d): present and fresh, skipped", name, rep.seed)
            records[rep.seed, name] = record
            continue
        synset, state = load_synset(rep.run_dir, method.synset, image_shape=ds.image_shape,
                                    num_classes=ds.num_classes)
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
            integrity.write_json(out, record)
            log.info("evaluate %s (seed %d, %s): %.2f ± %.2f %% over %d runs", name, rep.seed,
                     augment, 100 * res.mean, 100 * res.std, res.runs)
            records[key] = record
    write_eval_metrics(base)  # logs/eval.jsonl (and TensorBoard): every seed, pooled as reported
    return records
