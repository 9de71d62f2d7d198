"""docs/distributed.md's time and memory tables, computed from one-GPU measurements.

    python bench/scaling_table.py                                   # the H200 anchors (eager replay)
    python bench/scaling_table.py --source bench/results/matching_nvidia_h200.json --method fast
    python bench/scaling_table.py ... --write docs/distributed.md   # replace the marked section

No multi-GPU host has been available, so the multi-rank figures are **computed**, not measured:

* per-step time of one call on ``rows`` rows: piecewise-linear in rows through the source's
  records of ``--method`` (time / N of each record, times the configuration's N); below the
  smallest record the smallest record's time is kept (a GPU under-filled by few rows does not get
  faster); above the largest, the last segment's slope continues;
* the eager replay (``replay``) runs a rank's BN groups one after another, the compiled path
  (``fast``) in one call: time = groups × t(g/T rows) or t(groups · g/T rows);
* peak memory: the same interpolation of peak GiB over the rows of one call;
* a group spread over T ranks (``distill.group_ranks``) adds 12 · depth small all-reduces per
  student step (4 per BN layer in the forward step, 8 in the replayed step; counted in
  tests/test_split_groups.py), charged at ``--latency-us`` each, an assumption (tens of µs for a
  small NCCL all-reduce over NVLink); the 2N parameter-sized all-reduces per iteration (~141 MB
  for CIFAR-10, N = 55) are left out (a few ms over NVLink).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SOURCE = os.path.join(HERE, "results", "anchors_design_h200.json")
START, END = "<!-- scaling-table:start -->", "<!-- scaling-table:end -->"
AMONG = [(125, 125), (1000, 1000), (1000, 125), (2500, 500), (2500, 125), (5000, 125)]
SPLIT = [(1000, 55), (5000, 80)]
RANKS = (1, 2, 4, 8)


class Profile:
    """Per-step seconds and peak GiB as functions of the rows in one call."""

    def __init__(self, records: list[dict], method: str, precision: str | None):
        rows = [r for r in records if r.get("method") == method and r.get("status") == "ok"
                and r.get("group") == r.get("batch")
                and (precision is None or r.get("precision") == precision)]
        if len(rows) < 2:
            raise SystemExit(f"need at least two one-group records of method {method!r}"
                             f"{f' at {precision}' if precision else ''}; found {len(rows)}")
        self.points = sorted((r["batch"], r["s_per_iter"] / r["steps"], r["peak_gib"])
                             for r in rows)

    def _interp(self, rows: float, col: int) -> float:
        pts = self.points
        if rows <= pts[0][0]:
            return pts[0][col]
        for (x0, *a), (x1, *b) in zip(pts, pts[1:]):
            if rows <= x1:
                return a[col - 1] + (b[col - 1] - a[col - 1]) * (rows - x0) / (x1 - x0)
        (x0, *a), (x1, *b) = pts[-2], pts[-1]
        return b[col - 1] + (b[col - 1] - a[col - 1]) * (rows - x1) / (x1 - x0)

    def step_seconds(self, rows: float) -> float:
        return self._interp(rows, 1)

    def peak_gib(self, rows: float) -> float:
        return self._interp(rows, 2)


def per_rank(p: Profile, method: str, batch: int, group: int, steps: int, ranks: int,
             team: int = 1) -> tuple[float, float, int]:
    """(compute seconds per iteration, peak GiB, idle ranks)."""
    groups, teams = batch // group, ranks // team
    mine = math.ceil(groups / teams)
    rows = group / team
    idle = max(teams - groups, 0) * team
    if method == "fast":
        return steps * p.step_seconds(mine * rows), p.peak_gib(mine * rows), idle
    return steps * mine * p.step_seconds(rows), p.peak_gib(rows), idle


def tables(p: Profile, method: str, latency_us: float, depth: int, label: str) -> str:
    out = [f"Computed from {label}, method `{method}` (not measured on several GPUs).", "",
           "Groups divided among ranks (`distill.group_ranks: 1`), N = 55:", "",
           "| \\|b\\| | g | G | s/iter R=1 | R=2 | R=4 | R=8 | peak GiB per rank |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for batch, group in AMONG:
        cells = []
        for r in RANKS:
            s, gib, idle = per_rank(p, method, batch, group, 55, r)
            cells.append(f"{s:.2f}" + (f" ({idle} idle)" if idle else ""))
        gib = per_rank(p, method, batch, group, 55, 1)[1]
        out.append(f"| {batch} | {group} | {batch // group} | " + " | ".join(cells)
                   + f" | {gib:.1f}" + (" (R=1)" if method == "fast" else "") + " |")
    out += ["", f"One BN group spread over R ranks (`distill.group_ranks: R`, |b| = g), "
                f"ConvNet depth {depth}: compute + {12 * depth} small all-reduces per student "
                f"step at an assumed {latency_us:g} µs each:", "",
            "| g | N | R | rows per rank | compute s/iter | + all-reduce latency s | "
            "s/iter | peak GiB per rank |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for group, steps in SPLIT:
        for r in RANKS:
            s, gib, _ = per_rank(p, method, group, group, steps, r, team=r)
            lat = 0.0 if r == 1 else steps * 12 * depth * latency_us * 1e-6
            out.append(f"| {group} | {steps} | {r} | {group // r} | {s:.2f} | {lat:.2f} | "
                       f"{s + lat:.2f} | {gib:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="bench/matching.py results JSON")
    ap.add_argument("--method", default="replay", choices=("replay", "fast", "unrolled"))
    ap.add_argument("--precision", default=None, help="use only records of this precision")
    ap.add_argument("--latency-us", type=float, default=30.0)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--write", default=None, help="replace the marked section of this file")
    args = ap.parse_args()
    with open(args.source) as f:
        raw = f.read()
    doc = json.loads(raw)
    machine = doc.get("machine", "unknown machine")
    if machine in raw and "]" not in machine:
        # a link to the source, so tests/test_quoted_figures.py checks the quoted machine text
        target = os.path.relpath(args.source, os.path.dirname(os.path.abspath(args.write))
                                 if args.write else os.curdir).replace(os.sep, "/")
        machine = f"[{machine}]({target})"
    label = f"`{os.path.relpath(args.source)}` ({machine})"
    text = tables(Profile(doc["records"], args.method, args.precision), args.method,
                  args.latency_us, args.depth, label)
    cmd = "python bench/scaling_table.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v is not None and k != "write" and v != ap.get_default(k))
    text = f"`{cmd.strip()}`\n\n{text}"
    print(text)
    if args.write:
        with open(args.write) as f:
            page = f.read()
        if START not in page or END not in page:
            raise SystemExit(f"{args.write} has no {START} ... {END} section")
        page = re.sub(re.escape(START) + ".*?" + re.escape(END),
                      lambda _: f"{START}\n{text}\n{END}", page, flags=re.S)
        with open(args.write, "w") as f:
            f.write(page)


if __name__ == "__main__":
    main()
