"""SelMatch distillation entry point.

    accelerate launch distill/main.py --config configs/cifar10_ipc250.yaml        # GPU(s)
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml \\
        distill/main.py --config configs/quickstart.yaml                           # 2 CPU ranks
    python distill/main.py --config configs/quickstart.yaml [--resume]            # one process
    selmatch distill --config configs/quickstart.yaml [--resume]                  # same

Reads the experts and scores of ``run_dir``, selects the initial set (``select.init``), saves it as
``synset/<method>_init.pt``, distills D_distill by trajectory matching, checkpoints every
``distill.checkpoint_every`` iterations to ``checkpoints/<method>.pt`` and saves the result as
``synset/<method>.pt`` (selmatch, mtt or merge). Metrics go to ``logs/distill_<method>.jsonl``.

With R ranks, each rank computes a contiguous block of every student step's |b|/g batch-norm
groups (``distill.bn_group``); the result is the same for any R, so use g <= |b|/R or some ranks
idle. Ranks' states are compared every ``distill.check_every`` iterations. docs/distributed.md
has the collectives, the memory/time scaling and every launch recipe.
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a script: keep distill/ itself off sys.path (module names)
    import os
    import sys

    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import logging
import sys

from distill import storage
from distill.config import ConfigError, RunConfig, syn_lr_init
from distill.config_io import load_config, save_config
from distill.data import Dataset, load_configured
from distill.distiller import Distiller, StaleCheckpointError, method_name
from distill.preflight import log_summary
from distill.freshness import stamp
from distill.metrics import JsonlSink, Metrics, read_jsonl, tensorboard_sinks
from distill.runtime import DivergedRanksError, Runtime
from distill.scores import load_scores, scores_digest
from distill.selection import make_selection
from distill.synset import SyntheticSet
from distill.trajectories import ExpertStore

log = logging.getLogger("distill.main")


def initial_set(cfg: RunConfig, ds: Dataset, source: RunConfig | None = None) -> SyntheticSet:
    """The selection of ``select.init`` as a synthetic set (float32, CPU); scores are read from
    ``source.run_dir`` (default: ``cfg``'s)."""
    scores = None if cfg.select.init == "random" else \
        load_scores((source or cfg).run_dir, cfg.scores.kind)
    sel = make_selection(cfg.select.init, scores=scores, labels=ds.y_train.numpy(),
                         num_classes=ds.info.num_classes, ipc=cfg.select.ipc,
                         beta=cfg.select.beta, alpha=cfg.distill.alpha, seed=cfg.seed)
    return SyntheticSet.from_selection(sel, ds.x_train, syn_lr_init(cfg))


def result_stamp(cfg: RunConfig, source: RunConfig | None = None) -> str:
    """Freshness stamp of a distilled set (distill/freshness.py): every field of the stage,
    iterations included, and the identity of the experts and scores it was made from."""
    src = source or cfg
    inputs = {"experts": ExpertStore(src).digest()}
    if cfg.select.init != "random":
        inputs["scores"] = scores_digest(src.run_dir, cfg.scores.kind)
    return stamp(cfg, "distill", inputs=inputs)


def _meta(cfg: RunConfig, method: str, stamp_: str, **extra) -> dict:
    return {"method": method, "dataset": cfg.data.name, "ipc": cfg.select.ipc,
            "alpha": cfg.distill.alpha, "beta": cfg.select.beta, "init": cfg.select.init,
            "seed": cfg.seed, "iterations": cfg.distill.iterations, "stamp": stamp_, **extra}


def run_distill(cfg: RunConfig, *, resume: bool = False, runtime: Runtime | None = None,
                progress: bool = True, source: RunConfig | None = None,
                method: str | None = None, restart_stale: bool = False) -> SyntheticSet:
    """Select, distill and save; returns the final synthetic set.

    ``source``: the run whose experts and scores are used (default ``cfg``; ``selmatch run``
    repeats distillation per seed in ``run_dir/seeds/<s>`` on the main run's experts). ``method``:
    the artifact name (default :func:`method_name`). ``restart_stale``: with ``resume``, a
    checkpoint that cannot continue to this result is ignored (the run starts over) instead of
    refused. Everything that can refuse the run (data,
    scores, experts, a checkpoint from other settings, an unwritable run_dir) is checked before
    anything is written, so a refused run leaves the run directory as it was."""
    rt = runtime or Runtime.create()
    src = source or cfg
    method = method or method_name(cfg)
    ds = load_configured(cfg.data)
    synset = initial_set(cfg, ds, src)
    log.info("%s: %s, %d images (%d learnable), %s", method, cfg.data.name, len(synset),
             len(synset.distilled), rt.describe())
    distiller = None
    if len(synset.distilled) and cfg.distill.iterations:
        synset = synset.to(rt.device)
        distiller = _distiller(cfg, ds, synset, rt, method, src, resume=resume,
                               restart_stale=restart_stale)
    # rank 0 writes: it checks, and every rank learns the verdict (no rank left in a collective)
    problem = None
    if rt.is_main:
        try:
            storage.check_writable(cfg.run_dir)
        except storage.RunDirError as err:
            problem = str(err)
    problem = rt.broadcast_object(problem)
    if problem is not None:
        raise storage.RunDirError(problem)
    final_stamp = result_stamp(cfg, src)
    # checks done: from here on the run writes
    if rt.is_main:
        log_summary(cfg, ranks=rt.world_size, device=rt.device.type)
    if rt.is_main:
        save_config(cfg)
        storage.write_json(storage.join(cfg.run_dir, "data.json"), ds.describe())
        # the exact starting point (selection, learnable rows marked), kept for comparisons
        synset.save(cfg.run_dir, f"{method}_init", meta=_meta(cfg, f"{method}_init", final_stamp),
                    denormalize=ds.denormalize)
    if distiller is None:
        log.info("nothing to distill (alpha %.3g, %d iterations): the result is the selection",
                 cfg.distill.alpha, cfg.distill.iterations)
    else:
        distiller.run(checkpoint_url=_checkpoint_url(cfg, method), progress=progress)
        distiller.metrics.close()
    if rt.is_main:
        synset.save(cfg.run_dir, method, meta=_meta(cfg, method, final_stamp,
                                                    syn_lr=float(synset.syn_lr.detach())),
                    denormalize=ds.denormalize)
    rt.barrier()
    return synset


def _checkpoint_url(cfg: RunConfig, method: str) -> str:
    return storage.join(cfg.run_dir, "checkpoints", f"{method}.pt")


def _distiller(cfg: RunConfig, ds: Dataset, synset: SyntheticSet, rt: Runtime, method: str,
               source: RunConfig, *, resume: bool, restart_stale: bool) -> Distiller:
    """The Distiller, resumed from the checkpoint when asked (and refused before any write when
    the checkpoint cannot continue to this config's result)."""
    ckpt = _checkpoint_url(cfg, method)
    metrics_url = storage.join(cfg.run_dir, "logs", f"distill_{method}.jsonl")
    sinks = [JsonlSink(metrics_url), *tensorboard_sinks(cfg, f"distill_{method}")] \
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
        if sinks and storage.exists(metrics_url):  # keep the metrics logged up to the checkpoint
            sinks[0].records = [r for r in read_jsonl(metrics_url)
                                if r.get("step", 0) <= distiller.iteration]
        log.info("resumed from %s at iteration %d", ckpt, distiller.iteration)
    elif resume:
        log.info("no checkpoint at %s; starting from iteration 0", ckpt)
    return distiller


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SelMatch distillation (trajectory matching)")
    parser.add_argument("--config", required=True, help="YAML config (path or fsspec URL)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is present")
    args, overrides = parser.parse_known_args(argv)
    rt = Runtime.create(cpu=True if args.cpu else None)
    logging.basicConfig(level=logging.INFO if rt.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {rt.rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    ok = False
    try:
        cfg = load_config(args.config, overrides)
        run_distill(cfg, resume=args.resume, runtime=rt)
        ok = True
    except (ConfigError, OSError, ValueError) as err:
        print(f"distill: {err}", file=sys.stderr)
        return 2
    except (FloatingPointError, DivergedRanksError) as err:  # the last good checkpoint is kept
        print(f"distill: {err}", file=sys.stderr)
        return 1
    finally:
        rt.close(ok=ok)  # a barrier only when every rank got to the end
    return 0


def cmd_distill(args, overrides: list[str]) -> int:
    """``selmatch distill``: the same as running this file (one process, or one rank per process
    under ``accelerate launch -m launch.cli distill``: the group is torn down here too)."""
    cfg = load_config(args.config, overrides)
    rt = Runtime.create()
    ok = False
    try:
        run_distill(cfg, resume=args.resume, runtime=rt)
        ok = True
    finally:
        rt.close(ok=ok)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
