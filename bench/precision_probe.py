"""How far the float32 matching gradient lands from float64, eager and compiled, and how much of
that is the problem's own sensitivity: the same plans from starts moved by one float32 ulp.

    python bench/precision_probe.py                              # eager, eager 2 threads, compiled
    python bench/precision_probe.py --paths compiled --variant twopass --tag twopass
    python bench/precision_probe.py --problem small --tag small     # the test's problem
    python bench/precision_probe.py --problem small --paths compiled --variant f32stats --tag small_f32stats
    python bench/precision_probe.py --problem small --paths compiled --variant f32stats+aot_eager --tag small_f32stats_aot_eager

The problem (bench/matching.py's expert-like one, DSA off): a ConvNet-BN of width 64, depth 3 on
500 random-normal 32×32×3 images, |b| = g = 32, N = 10, inner lr 0.01, the target 20 plain
float64 SGD steps from the start; five plans (make_plan iterations 0..4). For every plan it reports
the image- and lr-gradient relative error against a float64 eager replay

* from the unperturbed start (the figure a single benchmark row shows), and
* the maximum over ``--perturbations`` starts whose entries are moved by 0 or ±1 ulp at random,
  and the median over those and the start (the float64 reference recomputed at each moved
  start: the error is the computation's, not the input's). With the default 4 moved starts the
  median of 5 ignores up to two starts at which one ulp flipped a ReLU or max-pool choice.

``--problem small`` is tests/test_fast_precision.py's problem (width 32, depth 2, 200 16×16×3
images, N = 6, three plans): one ulp flips fewer ReLU and max-pool choices there, so the median
over moved starts shows each path's own rounding floor.

``--variant`` changes the compiled path only, to locate where its rounding differs: ``aot_eager``
(the same captured and decomposed graph run by ATen's kernels instead of Inductor's code),
``f32stats``
(batch norm's statistics accumulated in float32, as before distill/functional.py took them in
float64), ``twopass`` (batch-norm variance from the mean, then the centred squares, instead of
``var_mean``),
``aten_reductions`` (sum, mean and var_mean run by ATen's kernels inside the compiled graph, as
the eager path runs them), ``layout_off`` (Inductor's layout optimisation off). Inductor's caches
are bypassed for variants. Writes ``<out>.json`` and appends a table to ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for path in (ROOT, HERE, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402


def float32_statistics(hg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(var, mean) of each BN group in the input's dtype: distill/functional.py before it took
    them in float64."""
    return torch.var_mean(hg, dim=(1, 3, 4), correction=0, keepdim=True)


def two_pass_statistics(hg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = hg.mean(dim=(1, 3, 4), keepdim=True)
    return (hg - mean).pow(2).mean(dim=(1, 3, 4), keepdim=True), mean


def batch_norm_with(statistics):
    """distill/functional.py's batch norm (one rank's groups) with its (var, mean) from
    ``statistics`` of the ``[G, g, C, H, W]`` view; other norms and teams unchanged."""
    import distill.functional as fn

    original = fn.FunctionalConvNet._norm

    def norm(h, blk, parts, groups, team):
        if blk.norm != "batch" or (team is not None and team.size > 1):
            return original(h, blk, parts, groups, team)
        n, c, hh, ww = h.shape
        hg = h.view(groups, n // groups, c, hh, ww)
        var, mean = statistics(hg)
        y = ((hg - mean) * torch.rsqrt(var + blk.eps)).view(n, c, hh, ww)
        if blk.norm_affine is None:
            return y
        w, b = parts[blk.norm_affine], parts[blk.norm_affine + 1]
        return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

    return norm


def patch_batch_norm_statistics(statistics) -> None:
    import distill.functional as fn

    fn.FunctionalConvNet._norm = staticmethod(batch_norm_with(statistics))


def apply_variant(name: str) -> None:
    if name == "base":
        return
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
    if name == "aot_eager":  # the compiled graph run by ATen's kernels, no code generation
        return  # main() passes the backend
    if name == "f32stats":  # batch norm's statistics in float32, as before the fix
        patch_batch_norm_statistics(float32_statistics)
    elif name == "twopass":  # the mean, then the centred squares
        patch_batch_norm_statistics(two_pass_statistics)
    elif name == "aten_reductions":
        from torch._inductor import lowering

        aten = torch.ops.aten
        for op in (aten.sum.dim_IntList, aten.sum.default, aten.var_mean.correction,
                   aten.mean.dim):
            lowering.lowerings.pop(op, None)
            lowering.make_fallback(op, warn=False)
    elif name == "layout_off":
        torch._inductor.config.layout_optimization = False
    else:
        raise SystemExit(f"--variant: base, aot_eager, f32stats, twopass, aten_reductions or "
                         f"layout_off (joined by +); got {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", default="eager,eager-2-threads,compiled")
    p.add_argument("--variant", default="base")
    p.add_argument("--problem", choices=("full", "small"), default="full")
    p.add_argument("--perturbations", type=int, default=4)
    p.add_argument("--tag", default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "precision_cpu"))
    args = p.parse_args()
    for variant in args.variant.split("+"):  # e.g. f32stats+aot_eager
        apply_variant(variant)
    from helpers import float32_errors, float64_references, moved_start, precision_problem

    torch.set_num_threads(1)
    model, start64, images, labels, target64, plans = precision_problem(args.problem)
    starts = [moved_start(start64.float(), k) for k in range(args.perturbations + 1)]
    refs = float64_references(model, images, labels, target64, plans, starts)
    rows = []
    for path in args.paths.split(","):
        torch.set_num_threads(2 if path == "eager-2-threads" else 1)
        t0 = time.perf_counter()
        backend = "aot_eager" if "aot_eager" in args.variant.split("+") else "inductor"
        img, lr, ran = float32_errors(model, images, labels, target64, plans, starts, refs,
                                      "on" if path == "compiled" else "off", backend=backend)
        label = path + ("" if path != "compiled" or args.variant == "base" else
                        f" ({args.variant})")
        rows.append({"path": label, "steps_name": ran,
                     "seconds": round(time.perf_counter() - t0, 1),
                     "image": {"start": [e[0] for e in img],
                               "median": [statistics.median(e) for e in img],
                               "max": [max(e[1:]) for e in img]},
                     "lr": {"start": [e[0] for e in lr],
                            "median": [statistics.median(e) for e in lr],
                            "max": [max(e[1:]) for e in lr]}})
        print(json.dumps(rows[-1]), flush=True)
    doc = {"command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
           "torch": torch.__version__, "perturbations": args.perturbations,
           "load_1min": os.getloadavg()[0], "rows": rows}
    tag = f"_{args.tag}" if args.tag else ""
    with open(args.out + tag + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"`{doc['command']}` (torch {doc['torch']}; {args.perturbations} moved starts)", "",
             "| path | gradient | from the start, per plan | median over the start and the moved starts | "
             "max over moved starts |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        for g in ("image", "lr"):
            cells = [" ".join(f"{v:.1e}" for v in r[g][k]) for k in ("start", "median", "max")]
            lines.append(f"| {r['path']} | {g} | " + " | ".join(cells) + " |")
    with open(args.out + ".md", "a") as f:
        f.write("\n".join(lines) + "\n\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
