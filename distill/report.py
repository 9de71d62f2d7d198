"""The run report: ``report.md`` + ``results.json`` + PNG plots in the run directory.

Reads what the stages wrote (``eval/<row>.json`` of every repetition seed, ``window/results.json``,
``synset/<set>.png``) and renders one table (row × metric), Table 3's ablation, the β curve of the
window search, the synthetic-image grids and the configuration. Each row's accuracy is the mean ±
std over every evaluation network of every seed (seeds × runs values, pooled; population std), and
the table says how many of each and which augmentation the row was trained with. Plots are made
with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io as _io
import statistics

from distill import storage
from distill.config import RunConfig
from distill.config_io import repetitions
from distill.methods import METHODS, chosen

_SCORE_NAME = {"forgetting": "forgetting", "el2n": "EL2N", "cscore": "C-score"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def beta_curve_png(window: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(window["betas"], [100 * a for a in window["val_accuracy"]], "o-")
    ax.axvline(window["best_beta"], color="grey", ls="--", lw=1)
    ax.set_xlabel("window start β (fraction of each class, hardest first)")
    ax.set_ylabel(f"{window.get('metric', 'accuracy')} (%)")
    ax.set_title(f"window search ({window['epochs']} epochs per β)")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def pool(records: list[dict]) -> dict:
    """One row from its repetitions' eval records: accuracies of all seeds × runs pooled."""
    accs = [a for r in records for a in r["accuracies"]]
    runs = sorted({r["runs"] for r in records})
    first = records[0]
    return {
        "mean": statistics.fmean(accs), "std": statistics.pstdev(accs), "n": len(accs),
        "seeds": [r["seed"] for r in records], "runs_per_seed": runs[0] if len(runs) == 1 else runs,
        "seed_means": [r["mean"] for r in records],
        "easy_acc": _mean([r.get("easy_acc") for r in records]),
        "hard_acc": _mean([r.get("hard_acc") for r in records]),
        "coverage": _mean([r.get("coverage") for r in records]),
        "augment": first["augment"], "model": first["model"], "epochs": first["epochs"],
        "n_images": first["n_images"], "n_distilled": first.get("n_distilled", 0),
        "synset": first.get("synset"), "score": first.get("score"),
        "iterations": first.get("iterations"), "per_seed": records,
    }


def label(name: str, row: dict) -> str:
    score = row.get("score")
    return METHODS[name].label.format(score=_SCORE_NAME.get(score, score or "?"))


def collect(cfg: RunConfig) -> dict:
    """Everything the report shows, as one JSON-serialisable dict."""
    reps = repetitions(cfg)
    methods = {}
    for name in chosen(cfg):
        records = [storage.read_json(url) for url in
                   (storage.join(r.run_dir, "eval", f"{name}.json") for r in reps)
                   if storage.exists(url)]
        if records:
            methods[name] = {**pool(records), "label": ""}
            methods[name]["label"] = label(name, methods[name])
    window_url = storage.join(cfg.run_dir, "window", "results.json")
    window = storage.read_json(window_url) if storage.exists(window_url) else None
    return {"methods": methods, "window": window, "seeds": [r.seed for r in reps]}


def _results_table(methods: dict) -> list[str]:
    lines = ["| method | images | distilled | eval augmentation | test acc (%) | seeds × runs "
             "| easy half (%) | hard half (%) | coverage (%) | epochs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in methods.values():
        acc = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
        lines.append(
            f"| {r['label']} | {r['n_images']} | {r['n_distilled']} | {r['augment']} | {acc} "
            f"| {len(r['seeds'])} × {r['runs_per_seed']} | {_pct(r['easy_acc'])} "
            f"| {_pct(r['hard_acc'])} | {_pct(r['coverage'])} | {r['epochs']} |")
    return lines


def _table3(methods: dict) -> list[str]:
    rows = [(n, r) for n, r in methods.items() if METHODS[n].table3 is not None]
    if not rows:
        return []
    tick = {True: "✓", False: ""}
    lines = ["## Ablation (the paper's Table 3)", "",
             "Same experts, scores and distillation budget for every row.", "",
             "| select init | partial update | combined augment | row | test acc (%) |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in rows:
        a, b, c = METHODS[name].table3
        lines.append(f"| {tick[a]} | {tick[b]} | {tick[c]} | {r['label']} "
                     f"| {100 * r['mean']:.2f} ± {100 * r['std']:.2f} |")
    return lines + [""]


def write_report(cfg: RunConfig, *, title: str, config_text: str, notes: list[str] | None = None,
                 command: str | None = None) -> str:
    """Write ``report.md``, ``results.json`` and ``report_beta.png``; returns the report URL."""
    run_dir = cfg.run_dir
    data = collect(cfg)
    storage.write_json(storage.join(run_dir, "results.json"), data)
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Produced by `{command}`.", ""]
    lines += notes or []
    if notes:
        lines.append("")
    lines += ["## Results", ""] + _results_table(data["methods"])
    lines += ["", "Accuracy: mean ± std (population) over every evaluation network of every "
              "repetition seed (seeds × runs values; each seed repeats selection, distillation and "
              "evaluation on the same experts). The set evaluated is always the final one; "
              "nothing is chosen by test accuracy. Eval augmentation by the paper's rule: DSA for "
              "selection and distillation baselines, combined (DSA on distilled rows, crop + flip "
              "on selected rows) for SelMatch, unless eval.augment overrides it. Easy/hard: the "
              "test halves with lower/higher EL2N under a trained expert. Coverage: share of test "
              "samples whose expert feature lies within r of a synthetic image, r = mean "
              "nearest-neighbour distance among real training features.", ""]
    lines += _table3(data["methods"])
    window = data["window"]
    if window:
        storage.write_bytes(storage.join(run_dir, "report_beta.png"), beta_curve_png(window))
        lines += ["## Window search", "",
                  f"{window['metric'].capitalize()} (held-out {window['validation_size']} training "
                  f"images, {window.get('augment', '?')} augmentation) after {window['epochs']} "
                  f"epochs per β; best β = {window['best_beta']:g}.",
                  "", "![beta curve](report_beta.png)", "",
                  "| β | " + " | ".join(f"{b:g}" for b in window["betas"]) + " |",
                  "| --- |" + " --- |" * len(window["betas"]),
                  "| acc (%) | " + " | ".join(f"{100 * a:.1f}" for a in window["val_accuracy"]) + " |",
                  ""]
    grids = []
    for name, r in data["methods"].items():
        synset = r.get("synset") or METHODS[name].synset
        if synset not in [g for g, _ in grids] and \
                storage.exists(storage.join(run_dir, "synset", f"{synset}.png")):
            grids.append((synset, r["label"]))
    if grids:
        lines += ["## Synthetic sets (run seed)", "",
                  "One column per class; frozen (selected) rows on top, distilled rows below.", ""]
        for synset, text in grids:
            lines += [f"**{synset}** ({text})", "", f"![{synset}](synset/{synset}.png)", ""]
    lines += ["## Configuration", "", "```yaml", config_text.rstrip(), "```", ""]
    url = storage.join(run_dir, "report.md")
    storage.write_text(url, "\n".join(lines))
    return url
