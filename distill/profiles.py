"""Measured matching-step profiles (``bench/results/matching_*.json``) turned into a time estimate.

bench/matching.py records seconds per iteration for (|b|, g, N) at one network shape and device.
A rank processes its groups one after another, so an iteration costs about
N × (groups on the busiest rank) × t(g), where t(g) is the time of one group in one forward step
plus its replay step. A record gives t(g_rec) = s/iter ÷ (N_rec × G_rec); for another g the estimate
interpolates linearly between the nearest measured groups, or scales t ∝ g beyond them. Only
records of the same network shape (width, depth, image size, channels), dtype, augmentation and
device kind (cpu or cuda) are used; the classes (the last layer only) may differ.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

from distill.estimate import MatchingShape, rank_share

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "bench", "results")


@dataclass(frozen=True)
class Profile:
    path: str
    machine: str
    records: tuple[dict, ...]


@dataclass(frozen=True)
class TimeEstimate:
    seconds: float          # one outer iteration on the busiest rank (communication excluded)
    group_step: float       # t(g): seconds of one group's forward + replay step
    source: str             # which file and records


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


def _depth(shape: MatchingShape) -> int | None:
    return getattr(shape.net.build(), "depth", shape.net.depth)


def _matches(rec: dict, shape: MatchingShape, device: str, method: str, depth: int | None) -> bool:
    return (rec.get("status") == "ok" and rec.get("method") == method
            and str(rec.get("device", "")).split(":")[0] == device
            and rec.get("width") == shape.net.width and rec.get("depth") == depth
            and rec.get("image_size") == shape.net.image_size
            and rec.get("channels") == shape.net.in_channels
            and rec.get("dtype") == "float32" and bool(rec.get("dsa")) == shape.dsa
            and shape.net.name == "convnet" and shape.net.norm == "batch")


def group_step_seconds(points: dict[int, float], group: int) -> float:
    """t(g) from measured {g: t}: exact, linear between neighbours, else ∝ g from the nearest."""
    if group in points:
        return points[group]
    below = [g for g in points if g < group]
    above = [g for g in points if g > group]
    if below and above:
        lo, hi = max(below), min(above)
        w = (group - lo) / (hi - lo)
        return points[lo] * (1 - w) + points[hi] * w
    nearest = max(below) if below else min(above)
    return points[nearest] * group / nearest


def iteration_time(shape: MatchingShape, ranks: int, device: str, profiles: list[Profile], *,
                   method: str = "replay") -> TimeEstimate | None:
    """Seconds per outer iteration from the first profile with records of this shape, or None."""
    depth = _depth(shape)
    for prof in profiles:
        recs = [r for r in prof.records if _matches(r, shape, device, method, depth)]
        if not recs:
            continue
        samples: dict[int, list[float]] = {}
        for r in recs:
            groups = r["batch"] // r["group"]
            samples.setdefault(r["group"], []).append(r["s_per_iter"] / (r["steps"] * groups))
        points = {g: sum(v) / len(v) for g, v in samples.items()}
        t = group_step_seconds(points, shape.group)
        threads = {r.get("threads") for r in recs} - {None}
        note = f", {'/'.join(map(str, sorted(threads)))} torch thread(s)" if threads else ""
        source = (f"{os.path.relpath(prof.path)} ({prof.machine}; {len(recs)} record(s), "
                  f"g measured {sorted(points)}{note})")
        return TimeEstimate(shape.steps * rank_share(shape.groups, ranks) * t, t, source)
    return None
