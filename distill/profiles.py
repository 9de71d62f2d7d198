"""Measured matching-step profiles (``bench/results/matching_*.json``) turned into a time estimate.

Two kinds of record share one format: bench/matching.py times the matching call alone for
(|b|, g, N) on one rank; bench/loop_profile.py times the real distillation loop (``python
distill/main.py`` on one rank, ``accelerate launch`` on several) and records its ``ranks`` and
``launcher``. A record is ``{method, device, width, depth, image_size, channels, dtype, dsa,
batch, group, steps, ranks, s_per_iter}``.

The estimate takes the **nearest** record of the same device kind (cpu or cuda), dtype and path
(eager replay or compiled: ``method``), in this order of preference:

1. the same network shape (width, depth, image size, channels; the classes, in the last layer
   only, may differ) and DSA setting;
2. the same number of ranks (what the launcher runs: communication and processes sharing cores
   are in a loop record's time and in no model);
3. the nearest FLOPs per iteration on the busiest rank (counted, distill/estimate.py);
4. a record of the whole loop over one of the matching call alone;

and scales its time by the FLOPs ratio (busiest rank, this run over the record). The estimate
says which record it used and how far it is from the run (:attr:`TimeEstimate.distance`), so an
extrapolation never reads as a measurement.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, replace

from distill.estimate import MatchingShape, Network, iteration_flops

def _results_dir() -> str:
    """bench/results of the checkout this code runs from, else of the working directory (an
    installed copy run inside a checkout)."""
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "bench", "results")
    return beside if os.path.isdir(beside) else os.path.join(os.getcwd(), "bench", "results")


RESULTS_DIR = _results_dir()


@dataclass(frozen=True)
class Profile:
    path: str
    machine: str
    records: tuple[dict, ...]


@dataclass(frozen=True)
class TimeEstimate:
    seconds: float          # one outer iteration on the busiest rank
    source: str             # which file and record
    distance: str           # how the record differs from this run ("same shape and ranks", ...)
    exact: bool             # the record has this run's shape, |b|, g, N and ranks: no scaling
    uncertainty: float | None = None  # relative, where the source states one (an anchor fit)
    extrapolated: bool = False        # outside what the source measured: the uncertainty is unknown


def load_profiles(directory: str | None = None) -> list[Profile]:
    """Every ``matching_*.json`` of ``directory`` (default bench/results; [] when absent)."""
    out = []
    for path in sorted(glob.glob(os.path.join(directory or RESULTS_DIR, "matching_*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        out.append(Profile(path, str(doc.get("machine", "?")), tuple(doc.get("records", ()))))
    return out


def _depth(net: Network) -> int | None:
    return getattr(net.build(), "depth", net.depth)


def _usable(rec: dict, device: str, method: str) -> bool:
    return (rec.get("status") == "ok" and rec.get("method") == method
            and str(rec.get("device", "")).split(":")[0] == device
            and rec.get("dtype") == "float32" and isinstance(rec.get("s_per_iter"), (int, float))
            and all(isinstance(rec.get(k), int) for k in ("width", "image_size", "channels",
                                                          "batch", "group", "steps")))


def _same_net(rec: dict, shape: MatchingShape, depth: int | None) -> bool:
    n = shape.net
    return (rec["width"] == n.width and rec.get("depth") == depth
            and rec["image_size"] == n.image_size and rec["channels"] == n.in_channels
            and bool(rec.get("dsa")) == shape.dsa and n.name == "convnet" and n.norm == "batch")


def record_shape(rec: dict, like: MatchingShape) -> MatchingShape:
    """The matching shape a record measured (its network a batch-norm ConvNet)."""
    net = Network(name="convnet", in_channels=rec["channels"], num_classes=like.net.num_classes,
                  image_size=rec["image_size"], width=rec["width"], depth=rec.get("depth"),
                  norm="batch")
    return replace(like, net=net, batch=rec["batch"], group=rec["group"], steps=rec["steps"],
                   ranks=int(rec.get("ranks", 1)), group_ranks=1)


def _describe(rec: dict) -> str:
    ranks = int(rec.get("ranks", 1))
    launcher = rec.get("launcher")
    return (f"ConvNet w{rec['width']} d{rec.get('depth')} {rec['image_size']}px×{rec['channels']}, "
            f"|b| {rec['batch']}, g {rec['group']}, N {rec['steps']}, {ranks} rank(s)"
            + (f" via {launcher}" if launcher else ""))


def iteration_time(shape: MatchingShape, ranks: int, device: str, profiles: list[Profile], *,
                   method: str | None = None) -> TimeEstimate | None:
    """Seconds per outer iteration from the nearest record (module docstring), or None when no
    record of this device kind, dtype and path exists."""
    method = method or ("fast" if shape.compiled else "replay")
    depth = _depth(shape.net)
    mine = iteration_flops(replace(shape, ranks=ranks), ranks)[1]
    best = None
    for prof in profiles:
        for rec in prof.records:
            if not _usable(rec, device, method):
                continue
            rec_ranks = int(rec.get("ranks", 1))
            theirs = iteration_flops(record_shape(rec, shape), rec_ranks)[1]
            key = (not _same_net(rec, shape, depth), abs(math.log2(rec_ranks / ranks)),
                   abs(math.log(mine / theirs)), "launcher" not in rec)  # then: a loop record
            if best is None or key < best[0]:
                best = (key, prof, rec, theirs)
    if best is None:
        return None
    (other_net, rank_gap, _, _), prof, rec, theirs = best
    ratio = mine / theirs
    same_step = (rec["batch"], rec["group"], rec["steps"]) == (shape.batch, shape.group,
                                                                 shape.steps)
    exact = not other_net and not rank_gap and same_step
    parts = ["same network" if not other_net else "another network shape"]
    parts.append("same ranks" if not rank_gap else
                 f"{int(rec.get('ranks', 1))} rank(s) measured vs {ranks} here "
                 f"(communication and core sharing not scaled)")
    if not same_step or other_net:
        parts.append(f"this run's FLOPs per rank {ratio:.3g}× the record's")
    source = (f"{os.path.relpath(prof.path)} ({prof.machine}; record: {_describe(rec)}; "
              f"{rec['s_per_iter']:.3g} s/iteration measured)")
    return TimeEstimate(seconds=rec["s_per_iter"] * ratio, source=source,
                        distance="exact match" if exact else ", ".join(parts), exact=exact)


# --------------------------------------------------------------------------------------------
# Recorded GPU anchors: a time on CUDA before this repository's benchmark has run on a GPU
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnchorFit:
    """t = a + b·F fitted by least squares over one anchors file's eager-replay records (F: the
    FLOPs of one outer iteration, counted for the record's network and (|b|, g, N));
    ``rel_error``: the largest |residual| / measured time of the fit over those records."""

    path: str
    machine: str
    net: Network
    a: float
    b: float
    rel_error: float
    flops: tuple[float, ...]


def load_anchor_fits(directory: str | None = None) -> list[AnchorFit]:
    """A fit per ``anchors_*.json`` of ``directory`` (default bench/results) whose ``network``
    names the network and device and that holds at least three eager-replay records."""
    import numpy as np

    out = []
    for path in sorted(glob.glob(os.path.join(directory or RESULTS_DIR, "anchors_*.json"))):
        try:
            with open(path) as f:
                doc = json.load(f)
            n = doc["network"]
            net = Network(name=n["name"], in_channels=int(n["channels"]),
                          num_classes=int(n["num_classes"]), image_size=int(n["image_size"]),
                          width=int(n["width"]), depth=n.get("depth"), norm=n["norm"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        recs = [r for r in doc.get("records", ()) if r.get("method") == "replay"
                and r.get("status") == "ok" and isinstance(r.get("s_per_iter"), (int, float))]
        if len(recs) < 3 or n.get("device") != "cuda":
            continue
        like = MatchingShape(net=net, batch=1, group=1, steps=1, n_images=1, n_matched=1,
                             n_learnable=1, joint=True)
        flops = [iteration_flops(record_shape({**n, **r}, like))[1] for r in recs]
        t = np.array([r["s_per_iter"] for r in recs], dtype=float)
        design = np.stack([np.ones(len(flops)), np.array(flops, dtype=float)], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, t, rcond=None)
        rel = float(np.max(np.abs(design @ np.array([a, b]) - t) / t))
        out.append(AnchorFit(path, str(doc.get("machine", "?")), net, float(a), float(b), rel,
                             tuple(flops)))
    return out


def anchor_time(shape: MatchingShape, ranks: int, fits: list[AnchorFit]) -> TimeEstimate | None:
    """Seconds per iteration on CUDA from the first anchor fit: a + b × this run's FLOPs on the
    busiest rank. Says the card, the path measured, the fit's error over its own records, and
    whether this run is inside the measured range on the same network (else: extrapolated)."""
    if not fits:
        return None
    fit = fits[0]
    mine = iteration_flops(replace(shape, ranks=ranks), ranks)[1]
    seconds = fit.a + fit.b * mine
    lo, hi = min(fit.flops), max(fit.flops)
    # the classes change the last layer only (as for the profiles' records)
    same = replace(shape.net, num_classes=fit.net.num_classes, depth=_depth(shape.net)) == fit.net
    inside = lo <= mine <= hi
    near = ("inside the measured range on the same network" if same and inside else
            "EXTRAPOLATED: no record near this run ("
            + ", ".join(([] if same else [f"the anchors' network is {fit.net.name} "
                                          f"w{fit.net.width} d{fit.net.depth} "
                                          f"{fit.net.image_size}px×{fit.net.in_channels}"])
                        + ([] if inside else [f"this run's {mine:.3g} FLOPs per rank lie outside "
                                              f"the anchors' {lo:.3g} … {hi:.3g}"])) + ")")
    source = (f"{os.path.relpath(fit.path)} ({fit.machine}): t = {fit.a:.3g} s + "
              f"{fit.b * 1e12:.3g} s/TFLOP × FLOPs per rank, fitted over {len(fit.flops)} eager "
              f"replay records (TF32, one BN group, one GPU); ±{fit.rel_error:.0%}: the fit's "
              f"largest error on its own records; the compiled path, other cards and the "
              f"all-reduces between ranks are not in it")
    return TimeEstimate(seconds=max(seconds, 0.0), source=source, distance=near, exact=False,
                        uncertainty=fit.rel_error, extrapolated=not (same and inside))
