"""The run report: ``report.md`` + ``results.json`` + PNG plots in the run directory.

Reads what the stages wrote (``eval/<row>.json`` of every repetition seed, ``window/results.json``,
``synset/<set>.png``) and renders the conclusion, one table (row × metric), Table 3's ablation,
the β curve of the window search, the synthetic-image grids and the configuration. Each row's
accuracy is the mean ± std over every evaluation network of every seed (seeds × runs values,
pooled; population std), and the table says how many of each and which augmentation the row was
trained with (and, for crop + flip on real rows, whether it flips and what the crop fills with).
Plots are made with matplotlib's Agg backend (no display needed).

**The conclusion comes first.** It names the best row, its lead over the next, and whether that
lead exceeds the noise: :data:`distill.search.Z` standard errors of the difference of the two
rows' means, each standard error from the sample std (ddof 1) of the row's seeds × runs values
over their square root. When SelMatch (combined augmentation) is not the best row, a sentence
says so and by how much. Seeds × runs values are not independent draws of one thing (the runs of
a seed share its set), so this is a yardstick, not a test.
"""

from __future__ import annotations

import io as _io
import math
import statistics

from distill import integrity, storage
from distill.config import RunConfig
from distill.config_io import repetitions
from distill.methods import METHODS, chosen
from distill.metrics import rewrite_metrics
from distill.search import Z

_EVAL_FIX = "run `selmatch evaluate --config F` (or `selmatch run`) to evaluate it again"
_SCORE_NAME = {"forgetting": "forgetting", "el2n": "EL2N", "cscore": "C-score"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def beta_curve_png(window: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    betas, accs = window["betas"], [100 * a for a in window["val_accuracy"]]
    ax.plot(betas, accs, "o-", label="window")
    tied = set(window.get("decision", {}).get("tied", []))
    if len(tied) > 1:
        ax.plot([b for b in betas if b in tied], [a for b, a in zip(betas, accs) if b in tied],
                "o", mfc="none", mec="tab:red", ms=10, label="tied with the best")
    for name, ref in window.get("references", {}).items():
        ax.axhline(100 * ref["val_acc"], ls=":", lw=1, color="tab:green" if name == "random"
                   else "tab:purple", label=f"{name} (pool)")
    ax.axvline(window["best_beta"], color="grey", ls="--", lw=1)
    ax.legend(fontsize=7)
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
        "augment": first["augment"], "flip": first.get("flip"),
        "crop_fill": first.get("crop_fill"), "model": first["model"],
        "network": {k: first.get(k) for k in ("width", "depth", "norm")},
        "epochs": first["epochs"], "values": accs,
        "n_images": first["n_images"], "n_distilled": first.get("n_distilled", 0),
        "synset": first.get("synset"), "score": first.get("score"),
        "iterations": first.get("iterations"), "per_seed": records,
        "start": first.get("start"), "alpha": first.get("alpha"),
        "alpha_source": first.get("alpha_source"),
    }


def label(name: str, row: dict) -> str:
    score = row.get("score")
    return METHODS[name].label.format(score=_SCORE_NAME.get(score, score or "?"))


def collect(cfg: RunConfig) -> dict:
    """Everything the report shows, as one JSON-serialisable dict."""
    reps = repetitions(cfg)
    methods = {}
    for name in chosen(cfg):
        records = [integrity.read_json(url, fix=_EVAL_FIX) for url in
                   (storage.join(r.run_dir, "eval", f"{name}.json") for r in reps)
                   if storage.exists(url)]
        if records:
            methods[name] = {**pool(records), "label": ""}
            methods[name]["label"] = label(name, methods[name])
    window_url = storage.join(cfg.run_dir, "window", "results.json")
    window = integrity.read_json(window_url, fix="run `selmatch window --config F` (or "
                                 "`selmatch run`) to search again") \
        if storage.exists(window_url) else None
    return {"methods": methods, "window": window, "seeds": [r.seed for r in reps]}


def augment_label(row: dict) -> str:
    """The row's evaluation augmentation, with how its real rows are cropped and flipped."""
    aug = row["augment"]
    if row.get("flip") is None:
        return aug
    part = "crop + flip" if row["flip"] else "crop, no flip"
    fill = f", {row['crop_fill']} fill" if row.get("crop_fill") else ""
    return f"{aug} (real rows: {part}{fill})"


def start_label(row: dict) -> str:
    """The row's start and where it came from: ``window β = 0.4 (window search)``."""
    start = row.get("start")
    if not start:
        return "–"
    what = f"window β = {start['beta']:g}" if start["init"] == "window" else start["init"]
    return f"{what} ({start.get('source', '?')})"


def alpha_label(row: dict) -> str:
    alpha = row.get("alpha")
    if alpha is None:
        return "–"
    source = row.get("alpha_source")
    return f"{alpha:g}" + (f" ({source})" if source and alpha not in (0.0,) else "")


def _results_table(methods: dict) -> list[str]:
    lines = ["| method | start (from) | α (from) | images | distilled | eval augmentation | "
             "test acc (%) | seeds × runs | easy half (%) | hard half (%) | coverage (%) | "
             "epochs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in methods.values():
        acc = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
        lines.append(
            f"| {r['label']} | {start_label(r)} | {alpha_label(r)} | {r['n_images']} | "
            f"{r['n_distilled']} | {augment_label(r)} | {acc} "
            f"| {len(r['seeds'])} × {r['runs_per_seed']} | {_pct(r['easy_acc'])} "
            f"| {_pct(r['hard_acc'])} | {_pct(r['coverage'])} | {r['epochs']} |")
    return lines


def _standard_error(values: list[float]) -> float | None:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def compare_rows(a: dict, b: dict) -> dict:
    """Lead of row ``a`` over row ``b`` (in accuracy), its standard error and whether it exceeds
    :data:`Z` of them (None when a row has a single value)."""
    lead = a["mean"] - b["mean"]
    sa, sb = _standard_error(a["values"]), _standard_error(b["values"])
    if sa is None or sb is None:
        return {"lead": lead, "se": None, "beyond_noise": None}
    se = math.sqrt(sa ** 2 + sb ** 2)
    return {"lead": lead, "se": se, "beyond_noise": lead > Z * se}


def conclusion(methods: dict) -> dict | None:
    """The best row, its lead over the next, and SelMatch's place (None without two rows)."""
    if len(methods) < 2:
        return None
    ranked = sorted(methods, key=lambda n: -methods[n]["mean"])
    best, second = ranked[0], ranked[1]
    out = {"ranking": ranked, "best": best, "second": second,
           **compare_rows(methods[best], methods[second])}
    if "selmatch" in methods and best != "selmatch":
        out["selmatch"] = {"rank": ranked.index("selmatch") + 1,
                           **compare_rows(methods[best], methods["selmatch"])}
    return out


def _noise_words(c: dict) -> str:
    if c["beyond_noise"] is None:
        return "one value per row: the noise is not measured"
    words = "beyond" if c["beyond_noise"] else "within"
    return (f"{words} the noise ({Z:g} standard errors of the difference: "
            f"{100 * Z * c['se']:.2f} points)")


def conclusion_lines(methods: dict, found: dict | None) -> list[str]:
    if found is None:
        return []
    best, second = methods[found["best"]], methods[found["second"]]
    n = f"{len(best['seeds'])} seed(s) × {best['runs_per_seed']} run(s)"
    lines = ["## Conclusion", "",
             f"**Best row: {best['label']}**, {100 * best['mean']:.2f} ± {100 * best['std']:.2f}% "
             f"test accuracy ({n}). It leads the next row, {second['label']} "
             f"({100 * second['mean']:.2f} ± {100 * second['std']:.2f}%), by "
             f"{100 * found['lead']:.2f} points: {_noise_words(found)}"
             + ("." if found["beyond_noise"] else
                "; the two are not told apart." if found["beyond_noise"] is False else ".")]
    sm = found.get("selmatch")
    if sm is not None:
        row = methods["selmatch"]
        lines.append("")
        lines.append(
            f"**SelMatch (combined augmentation) is not the best row**: "
            f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}%, rank {sm['rank']} of "
            f"{len(methods)}, {100 * sm['lead']:.2f} points below {best['label']}: "
            f"{_noise_words(sm)}.")
    elif found["best"] == "selmatch":
        lines += ["", "SelMatch (combined augmentation) is the best row."]
    return lines + [""]


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


def _window_lines(cfg: RunConfig, window: dict) -> list[str]:
    decision = window.get("decision", {})
    lines = ["## Window search", "",
             f"{window['metric'].capitalize()} on one validation split: "
             f"{window['validation_size']} training images ({window['validation_fraction']:g} of "
             f"each class, drawn from seed {window['validation_seed']}), held out of the pool of "
             f"{window['pool_size']} from which every candidate selects, so every β (and each "
             f"reference) is scored on the same images; {window['runs_per_point']} network(s) "
             f"per β, {window['epochs']} epochs each, {window.get('augment', '?')} augmentation. "
             f"Chosen β = {window['best_beta']:g} (highest accuracy: β = "
             f"{decision.get('best', window['best_beta']):g}; rule: {decision.get('rule', '?')}). "
             f"The best-window row then selects from the whole training set at that β.",
             "", "![beta curve](report_beta.png)", "",
             "| β | " + " | ".join(f"{b:g}" for b in window["betas"]) + " |",
             "| --- |" + " --- |" * len(window["betas"]),
             "| acc (%) | " + " | ".join(f"{100 * a:.1f}" for a in window["val_accuracy"]) + " |",
             ""]
    leads = decision.get("leads", {})
    if leads:
        lines += ["| β | " + " | ".join(f"{b:g}" for b in window["betas"]) + " |",
                  "| --- |" + " --- |" * len(window["betas"]),
                  "| best − β (points, ± 1 se) | " + " | ".join(
                      "–" if f"{b:g}" not in leads else
                      f"{100 * leads[f'{b:g}'][0]:.1f} ± {100 * leads[f'{b:g}'][1]:.1f}"
                      for b in window["betas"]) + " |", ""]
    for name, ref in window.get("references", {}).items():
        lines.append(f"Reference, {name} selection from the same pool: {100 * ref['val_acc']:.1f}% "
                     f"(best window − {name}: {100 * ref['best_minus_this']:.1f} ± "
                     f"{100 * ref['se']:.1f} points).")
    lines += [f"**WARNING: {w}**" for w in decision.get("warnings", [])]
    start = window.get("start")
    if start:
        lines.append(f"SelMatch's start, if the search decides it (select.init auto, "
                     f"select.beta null): the {'window' if start['init'] == 'window' else 'random subset'}"
                     f": {start['why']}. This run's start: {cfg_start_text(cfg, window)}.")
    return lines + [""]


def cfg_start_text(cfg: RunConfig, window: dict) -> str:
    """The start ``cfg`` asks for, resolved with the search's decision."""
    from distill.selection import resolve_start

    start = resolve_start(cfg.select.init, cfg.select.beta, window,
                          source="tune" if cfg.tuned else "config")
    return start.describe()


def eval_metric_records(data: dict) -> list[dict]:
    """The report's numbers as metric records: every run of every seed of each row
    (``eval/<row>/run_acc``, step = its index over seeds × runs) and the pooled summaries the
    report shows (``eval/<row>/mean``, ``std``, ``n``, ``easy_acc``, ``hard_acc``,
    ``coverage`` at step 0)."""
    out = []
    for name, r in data["methods"].items():
        step = 0
        for rec in r["per_seed"]:
            for acc in rec["accuracies"]:
                out.append({"step": step, "method": name, "seed": rec["seed"],
                            f"eval/{name}/run_acc": acc})
                step += 1
        summary = {"mean": r["mean"], "std": r["std"], "n": r["n"], "easy_acc": r["easy_acc"],
                   "hard_acc": r["hard_acc"], "coverage": r["coverage"]}
        out.append({"step": 0, "method": name, **{f"eval/{name}/{k}": v
                                                   for k, v in summary.items() if v is not None}})
    return out


def write_eval_metrics(cfg: RunConfig) -> None:
    """``logs/eval.jsonl`` (and ``tensorboard/eval/``) rewritten from the eval records of every
    repetition seed, pooled as the report pools them."""
    rewrite_metrics(cfg, "eval", eval_metric_records(collect(cfg)))


def write_report(cfg: RunConfig, *, title: str, config_text: str, notes: list[str] | None = None,
                 command: str | None = None, stamp: dict | None = None) -> str:
    """Write ``report.md``, ``results.json`` (with ``stamp``: what made it) and
    ``report_beta.png``; returns the report URL."""
    run_dir = cfg.run_dir
    data = collect(cfg)
    data["conclusion"] = conclusion(data["methods"])
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Produced by `{command}`.", ""]
    lines += conclusion_lines(data["methods"], data["conclusion"])
    lines += notes or []
    if notes:
        lines.append("")
    lines += ["## Results", ""] + _results_table(data["methods"])
    lines += ["", "Accuracy: mean ± std (population) over every evaluation network of every "
              "repetition seed (seeds × runs values; each seed repeats selection, distillation and "
              "evaluation on the same experts). The set evaluated is always the final one; "
              "nothing is chosen by test accuracy. Eval augmentation by the paper's rule: DSA for "
              "selection and distillation baselines, combined (DSA on distilled rows, crop + flip "
              "on selected rows) for SelMatch, unless eval.augment overrides it; the crop + flip "
              "flips only flip-invariant data (eval.flip). Easy/hard: the "
              "test halves with lower/higher EL2N under a trained expert. Coverage: share of test "
              "samples whose expert feature lies within r of a synthetic image, r = mean "
              "nearest-neighbour distance among real training features.", ""]
    lines += _table3(data["methods"])
    window = data["window"]
    if window:
        storage.write_bytes(storage.join(run_dir, "report_beta.png"), beta_curve_png(window))
        lines += _window_lines(cfg, window)
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
    # last: its stamp says the report is complete (a crash before leaves it stale)
    integrity.write_json(storage.join(run_dir, "results.json"), {**data, **(stamp or {})})
    return url
