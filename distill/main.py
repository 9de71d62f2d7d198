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
from distill.config import ConfigError, RunConfig, load_config, save_config, syn_lr_init
from distill.data import Dataset, load_configured
from distill.distiller import Distiller, method_name, resume_hash
from distill.estimate import log_summary
from distill.metrics import JsonlSink, Metrics, read_jsonl, tensorboard_sinks
from distill.runtime import Runtime
from distill.scores import load_scores
from distill.selection import make_selection
from distill.synset import SyntheticSet
from distill.trajectories import ExpertStore

log = logging.getLogger("distill.main")


def initial_set(cfg: RunConfig, ds: Dataset) -> SyntheticSet:
    """The selection of ``select.init`` as a synthetic set (float32, CPU)."""
    scores = None if cfg.select.init == "random" else load_scores(cfg.run_dir, cfg.scores.kind)
    sel = make_selection(cfg.select.init, scores=scores, labels=ds.y_train.numpy(),
                         num_classes=ds.info.num_classes, ipc=cfg.select.ipc,
                         beta=cfg.select.beta, alpha=cfg.distill.alpha, seed=cfg.seed)
    return SyntheticSet.from_selection(sel, ds.x_train, syn_lr_init(cfg))


def _meta(cfg: RunConfig, method: str, **extra) -> dict:
    return {"method": method, "dataset": cfg.data.name, "ipc": cfg.select.ipc,
            "alpha": cfg.distill.alpha, "beta": cfg.select.beta, "init": cfg.select.init,
            "seed": cfg.seed, "iterations": cfg.distill.iterations, "hash": resume_hash(cfg),
            **extra}


def run_distill(cfg: RunConfig, *, resume: bool = False, runtime: Runtime | None = None,
                progress: bool = True) -> SyntheticSet:
    """Select, distill and save; returns the final synthetic set."""
    rt = runtime or Runtime.create()
    ds = load_configured(cfg.data)
    synset = initial_set(cfg, ds)
    method = method_name(cfg)
    log.info("%s: %s, %d images (%d learnable), %s", method, cfg.data.name, len(synset),
             len(synset.distilled), rt.describe())
    if rt.is_main:
        log_summary(cfg, ranks=rt.world_size, device=rt.device.type)
    if rt.is_main:
        save_config(cfg)
        storage.write_json(storage.join(cfg.run_dir, "data.json"), ds.describe())
        # the exact starting point (selection, learnable rows marked), kept for comparisons
        synset.save(cfg.run_dir, f"{method}_init", meta=_meta(cfg, f"{method}_init"),
                    denormalize=ds.denormalize)
    if len(synset.distilled) == 0 or cfg.distill.iterations == 0:
        log.info("nothing to distill (alpha %.3g, %d iterations): the result is the selection",
                 cfg.distill.alpha, cfg.distill.iterations)
    else:
        synset = synset.to(rt.device)
        _distill(cfg, ds, synset, rt, method, resume=resume, progress=progress)
    if rt.is_main:
        synset.save(cfg.run_dir, method, meta=_meta(cfg, method, syn_lr=float(synset.syn_lr.detach())),
                    denormalize=ds.denormalize)
    rt.barrier()
    return synset


def _distill(cfg: RunConfig, ds: Dataset, synset: SyntheticSet, rt: Runtime, method: str, *,
             resume: bool, progress: bool) -> None:
    ckpt = storage.join(cfg.run_dir, "checkpoints", f"{method}.pt")
    metrics_url = storage.join(cfg.run_dir, "logs", f"distill_{method}.jsonl")
    sinks = [JsonlSink(metrics_url), *tensorboard_sinks(cfg, f"distill_{method}")] \
        if rt.is_main else []
    distiller = Distiller(cfg, ds, synset, ExpertStore(cfg), comm=rt, device=rt.device,
                          metrics=Metrics(sinks), is_main=rt.is_main)
    if resume and storage.exists(ckpt):
        distiller.load_checkpoint(ckpt)
        if sinks:  # keep the metrics logged up to the checkpoint
            sinks[0].records = [r for r in read_jsonl(metrics_url)
                                if r.get("step", 0) <= distiller.iteration]
        log.info("resumed from %s at iteration %d", ckpt, distiller.iteration)
    elif resume:
        log.info("no checkpoint at %s; starting from iteration 0", ckpt)
    distiller.run(checkpoint_url=ckpt, progress=progress)
    distiller.metrics.close()


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
    try:
        cfg = load_config(args.config, overrides)
        run_distill(cfg, resume=args.resume, runtime=rt)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"distill: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # diverged; the last good checkpoint is kept
        print(f"distill: {err}", file=sys.stderr)
        return 1
    finally:
        rt.close()
    return 0


def cmd_distill(args, overrides: list[str]) -> int:
    """``selmatch distill``: the same as running this file in one process."""
    run_distill(load_config(args.config, overrides), resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
