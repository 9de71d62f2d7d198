"""How the α ranking of `selmatch tune` depends on the α-trial budget.

    python bench/alpha_budget.py --run_dir runs/alpha_budget          # quickstart (digits), CPU

For each α on a grid (β fixed at ``select.beta``) one distillation runs the config's full budget
(``distill.iterations``) and is scored, exactly like an α trial (distill/search.py: validation split,
the trial's epochs, combined augmentation), after 10%, 20%, 50% and 100% of it. Distillation is
deterministic and resumes bit for bit, so the set after k iterations of the long run is the set a
k-iteration trial would make. A second scoring of the 100% sets with another evaluation seed
gives the noise floor of the ranking. Writes bench/results/alpha_budget.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from distill.config_io import load_config
from distill.data import load_configured
from distill.distiller import Distiller
from distill.synset import SyntheticSet
from distill.trajectories import ExpertStore
from distill.scores import load_scores
from launch.experts import run_experts
from launch.scores import ensure_scores
from distill.search import METRIC, SearchContext

HERE = os.path.dirname(os.path.abspath(__file__))
FRACTIONS = (0.1, 0.2, 0.5, 1.0)


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def score(ctx: SearchContext, synset: SyntheticSet, seed: int) -> float:
    """The α trial's score (distill/search.py), its networks seeded from ``seed``."""
    return ctx.score(synset.images().detach().cpu(), synset.labels.cpu(),
                     synset.is_distilled.cpu(), "alpha", seed=seed)[METRIC]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(HERE, "..", "configs", "quickstart.yaml"))
    p.add_argument("--run_dir", default="runs/alpha_budget")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "alpha_budget"))
    args = p.parse_args()
    cfg = load_config(args.config, {"run_dir": args.run_dir})
    t_start = time.perf_counter()
    run_experts(cfg, workers=0, progress=False)
    ensure_scores(cfg)
    ds = load_configured(cfg.data)
    ctx = SearchContext(cfg, ds, load_scores(cfg.run_dir, cfg.scores.kind), device="cpu")
    budget = cfg.distill.iterations
    steps = [max(1, round(f * budget)) for f in FRACTIONS]
    beta = cfg.select.beta
    table = {}
    for alpha in args.alphas:
        sel = ctx.selection(beta, alpha)
        synset = SyntheticSet.from_selection(sel, ds.x_train, cfg.experts.lr)
        row = {}
        distiller = None
        for k in steps:
            if len(synset.distilled):
                run_cfg = dataclasses.replace(cfg, select=dataclasses.replace(cfg.select, beta=beta),
                                              distill=dataclasses.replace(cfg.distill, alpha=alpha,
                                                                          iterations=k))
                if distiller is None:
                    distiller = Distiller(run_cfg, ds, synset, ExpertStore(cfg))
                distiller.cfg = run_cfg  # continue the same run up to k iterations
                distiller.run(progress=False)
            row[k] = score(ctx, synset, cfg.seed)
            print(f"alpha {alpha:g} after {k} iterations: val acc {row[k]:.4f}", flush=True)
        row["replicate"] = score(ctx, synset, cfg.seed + 1000)
        table[alpha] = row
    alphas = list(table)
    full = [table[a][steps[-1]] for a in alphas]
    summary = []
    for f, k in zip(FRACTIONS, steps):
        accs = [table[a][k] for a in alphas]
        summary.append({"fraction": f, "iterations": k, "val_acc": accs,
                        "best_alpha": alphas[int(np.argmax(accs))],
                        "spearman_vs_full": spearman(accs, full)})
    noise = spearman([table[a]["replicate"] for a in alphas], full)
    result = {"config": args.config, "beta": beta, "alphas": alphas, "budget": budget,
              "summary": summary, "noise_floor_spearman": noise,
              "replicate_val_acc": [table[a]["replicate"] for a in alphas],
              "eval_runs": cfg.tune.eval_runs, "seconds": round(time.perf_counter() - t_start, 1),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "command": "python " + " ".join(sys.argv)}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
