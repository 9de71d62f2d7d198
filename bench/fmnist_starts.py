"""The tables of bench/fmnist_starts.sh (which start and which batch make SelMatch beat random
selection on Fashion-MNIST), one per part, from its run directories; and two small helpers the
script calls.

    python bench/fmnist_starts.py table ROOT PART --seconds S --version V --command C
        # writes bench/results/fmnist_starts_<PART>.{md,json}
    python bench/fmnist_starts.py overrides DIR [--alpha-only]   # tune's choice as overrides
    python bench/fmnist_starts.py start DIR                      # tune's start: window or random
    python bench/fmnist_starts.py summary    # the parts recorded so far, as one table (stdout)

Every figure comes from the run directories' results.json (each row pooled over seeds ×
evaluation networks, as the report pools it), window/results.json, tune/summary.json and the
distillation logs. The margin of a row over random selection is distill/report.py's
``compare_rows``: the difference of the two means, its standard error from the rows' seeds ×
networks values, and whether it exceeds 2 standard errors (seeds × networks values are not
independent draws, so this is a yardstick, not a test). For the parts that vary the batch or
the steps, random selection is the IPC 50 part's row (same experts, seeds and networks).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from distill.config_io import tuned_overlay  # noqa: E402
from distill.methods import METHODS  # noqa: E402
from distill.report import compare_rows  # noqa: E402
from fmnist_report import _json, _jsonl  # noqa: E402  (bench/ is on sys.path when run as a script)

PARTS = {"ipc50": "ipc50", "ipc100": "ipc100", "batch500": "ipc50_batch500",
         "steps20": "ipc50_steps20", "ipc300": "ipc300"}
TITLES = {"ipc50": "IPC 50 (5%)", "ipc100": "IPC 100 (10%)",
          "batch500": "IPC 50, every image in each student step (|b| 500, one BN group), N 10",
          "steps20": "IPC 50, |b| 50, N 20", "ipc300": "IPC 300 (30%), one seed"}


def distill_cost(run_dir: str, seeds: list[int], name: str) -> dict | None:
    """Median logged seconds per iteration and the largest logged process peak RSS."""
    seconds, peaks = [], []
    for s in seeds:
        base = run_dir if s == seeds[0] else os.path.join(run_dir, "seeds", str(s))
        for r in _jsonl(os.path.join(base, "logs", f"distill_{name}.jsonl")):
            seconds.append(r["seconds"])
            peaks.append(r.get("peak_rss_mib"))
    if not seconds:
        return None
    return {"s_per_iter": statistics.median(seconds),
            "peak_rss_mib": max(p for p in peaks if p is not None)}


def table(root: str, part: str, *, seconds: int, version: str, command: str) -> str:
    run_dir = os.path.join(root, PARTS[part])
    res = _json(os.path.join(run_dir, "results.json"))
    if res is None:
        raise SystemExit(f"{run_dir}/results.json is missing: run the part first")
    methods = res["methods"]
    random = methods.get("random") or (_json(os.path.join(root, "ipc50", "results.json")) or
                                       {}).get("methods", {}).get("random")
    doc = {"part": part, "command": command, "code_version": version, "seconds": seconds,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
           "load_1min": os.getloadavg()[0], "rows": {}}
    lines = [f"# Fashion-MNIST starts and batches: {TITLES[part]}", "",
             f"`bash bench/fmnist_starts.sh {part}` ran `{command}` "
             f"(code {version}, {doc['date']}, {doc['machine']}, 1-minute load "
             f"{doc['load_1min']:.2f}); wall time **{seconds} s** "
             f"({seconds / 3600:.2f} h). Table: `python bench/fmnist_starts.py table {root} "
             f"{part}`. Test accuracy (%) on the 10,000 test images, mean ± std (population) "
             f"over seeds × evaluation networks; margin over random selection: difference of "
             f"the means ± its standard error, and whether it exceeds 2 of them.", "",
             "| row | start | α | test acc (%) | seeds × networks | per-seed means | margin over "
             "random (points) | beyond 2 s.e. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in [n for n in METHODS if n in methods]:
        m = methods[name]
        start = m.get("start") or {}
        where = ("window β = %g" % start["beta"]) if start.get("init") == "window" else \
            start.get("init", "–")
        src = f" ({start['source']})" if start.get("source") else ""
        margin = "–"
        cmp = None
        if random is not None and name != "random":
            cmp = compare_rows(m, random)
            se = "–" if cmp["se"] is None else f"{100 * cmp['se']:.2f}"
            margin = f"{100 * cmp['lead']:+.2f} ± {se}"
        beyond = "–" if cmp is None or cmp["beyond_noise"] is None else \
            ("yes" if cmp["beyond_noise"] else "no")
        alpha = m.get("alpha")
        lines.append(f"| {m['label']} | {where}{src} | "
                     f"{'–' if alpha is None else f'{alpha:g}'} | "
                     f"{100 * m['mean']:.2f} ± {100 * m['std']:.2f} | {len(m['seeds'])} × "
                     f"{m['runs_per_seed']} | "
                     f"{', '.join(f'{100 * v:.2f}' for v in m['seed_means'])} | {margin} | "
                     f"{beyond} |")
        doc["rows"][name] = {"mean": m["mean"], "std": m["std"], "n": m["n"],
                             "seeds": m["seeds"], "seed_means": m["seed_means"],
                             "start": start, "alpha": alpha, "augment": m["augment"],
                             "margin_over_random": cmp}
    if "random" not in methods and random is not None:
        lines.append(f"| Random selection (the IPC 50 part's row) | random | – | "
                     f"{100 * random['mean']:.2f} ± {100 * random['std']:.2f} | "
                     f"{len(random['seeds'])} × {random['runs_per_seed']} | "
                     f"{', '.join(f'{100 * v:.2f}' for v in random['seed_means'])} | – | – |")
    lines.append("")
    window = res.get("window")
    if window:
        ref = window.get("references", {}).get("random", {})
        doc["window"] = {k: window[k] for k in ("betas", "val_accuracy", "best_beta", "start")}
        lines.append(f"- Window search ({window['validation_size']} validation images, "
                     f"{window['epochs']} epochs per point): best window β = "
                     f"{window['best_beta']:g}; validation accuracy by β "
                     + ", ".join(f"{b:g}: {100 * a:.1f}" for b, a in
                                 zip(window["betas"], window["val_accuracy"]))
                     + f"; random subset of the pool {100 * ref.get('val_acc', float('nan')):.1f}."
                     f" Validation picks the **{window['start']['init']}** start: "
                     f"{window['start']['why']}.")
    tune = _json(os.path.join(run_dir, "tune", "summary.json"))
    if tune:
        doc["tune"] = {"start": tune["start"], "selected": tune["selected"],
                       "warnings": tune["warnings"]}
        lines.append(f"- `selmatch tune`: start {tune['start']['init']}"
                     + (f" at β {tune['start']['beta']:g}" if tune['start']['beta'] is not None
                        else "") + f", α {tune['selected']['distill.alpha']:g} "
                     f"({tune['start']['why']}).")
        lines += [f"  - WARNING: {w}" for w in tune["warnings"]]
    for name in ("selmatch", "random_partial"):
        cost = distill_cost(run_dir, res["seeds"], name)
        if cost:
            doc.setdefault("distill", {})[name] = cost
            lines.append(f"- Distillation `{name}`: {cost['s_per_iter']:.3f} s/iteration "
                         f"(median of the logged iterations), process peak RSS "
                         f"{cost['peak_rss_mib']:.0f} MiB.")
    text = "\n".join(lines) + "\n"
    out = os.path.join(HERE, "results", f"fmnist_starts_{part}")
    with open(out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(text)
    return text


def summary() -> str:
    """One table over the recorded parts (bench/results/fmnist_starts_<part>.json): each row's
    mean ± std, its margin over the same IPC's random selection (± 1 standard error) and the
    verdict at 2 standard errors in both directions; with each distillation's s/iteration."""
    lines = ["| setting | row | test acc (%) | margin over random (points) | at 2 s.e. | "
             "distillation s/iteration |", "| --- | --- | --- | --- | --- | --- |"]
    for part in PARTS:
        doc = _json(os.path.join(HERE, "results", f"fmnist_starts_{part}.json"))
        if doc is None:
            continue
        for name, row in doc["rows"].items():
            cmp = row.get("margin_over_random")
            if cmp is None or cmp.get("se") is None:
                margin, verdict = "–", "–"
            else:
                lead, se = 100 * cmp["lead"], 100 * cmp["se"]
                margin = f"{lead:+.2f} ± {se:.2f}"
                verdict = "above" if lead > 2 * se else "below" if lead < -2 * se else "within"
            cost = doc.get("distill", {}).get(METHODS[name].synset, {})
            speed = f"{cost['s_per_iter']:.3g}" if cost.get("s_per_iter") else "–"
            setting = TITLES[part].replace("|", "\\|")  # a bar inside a table cell
            lines.append(f"| {setting} | {METHODS[name].label} | "
                         f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f} | {margin} | "
                         f"{verdict} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table")
    t.add_argument("root")
    t.add_argument("part", choices=sorted(PARTS))
    t.add_argument("--seconds", type=int, required=True)
    t.add_argument("--version", required=True)
    t.add_argument("--command", required=True)
    o = sub.add_parser("overrides")
    o.add_argument("dir")
    o.add_argument("--alpha-only", action="store_true")
    s = sub.add_parser("start")
    s.add_argument("dir")
    sub.add_parser("summary")
    args = p.parse_args()
    if args.what == "summary":
        print(summary())
    elif args.what == "table":
        print(table(args.root, args.part, seconds=args.seconds, version=args.version,
                    command=args.command))
    elif args.what == "start":
        print(tuned_overlay(args.dir)["select.init"])
    else:
        chosen = tuned_overlay(args.dir)
        parts = [f"--distill.alpha {chosen['distill.alpha']:g}"]
        if not args.alpha_only:
            beta = chosen["select.beta"]
            parts = [f"--select.init {chosen['select.init']}",
                     f"--select.beta {'null' if beta is None else f'{beta:g}'}"] + parts
        print(" ".join(parts))


if __name__ == "__main__":
    main()
