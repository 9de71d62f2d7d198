"""The run report: ``report.md`` + ``results.json`` + PNG plots in the run directory.

Reads what the stages wrote (``eval/<method>.json``, ``window/results.json``,
``synset/<method>.png``) and renders one table (method × metric, mean ± std over n runs), the β
curve of the window search, the synthetic-image grids and the coverage numbers. Plots are made with
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io as _io

from distill import storage

METHOD_ORDER = ("random", "topk", "window", "mtt", "selmatch", "merge")
METHOD_LABEL = {
    "random": "Random selection",
    "topk": "Top-k hardest (Forgetting)",
    "window": "Oracle window (best β)",
    "mtt": "MTT (random init, α = 1)",
    "selmatch": "SelMatch",
    "merge": "Merge (ablation)",
}


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


def collect(run_dir: str) -> dict:
    """Everything the report shows, as one JSON-serialisable dict."""
    methods = {}
    for method in METHOD_ORDER:
        url = storage.join(run_dir, "eval", f"{method}.json")
        if storage.exists(url):
            methods[method] = storage.read_json(url)
    window_url = storage.join(run_dir, "window", "results.json")
    window = storage.read_json(window_url) if storage.exists(window_url) else None
    return {"methods": methods, "window": window}


def write_report(run_dir: str, *, title: str, config_text: str, notes: list[str] | None = None,
                 command: str | None = None) -> str:
    """Write ``report.md``, ``results.json`` and ``report_beta.png``; returns the report URL."""
    data = collect(run_dir)
    storage.write_json(storage.join(run_dir, "results.json"), data)
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Produced by `{command}`.", ""]
    lines += notes or []
    if notes:
        lines.append("")
    lines += ["## Results", "",
              "| method | images | distilled | test acc (%) | easy half (%) | hard half (%) | coverage (%) | runs × epochs |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, r in data["methods"].items():
        acc = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
        lines.append(
            f"| {METHOD_LABEL.get(method, method)} | {r['n_images']} | {r.get('n_distilled', 0)} "
            f"| {acc} | {_pct(r.get('easy_acc'))} | {_pct(r.get('hard_acc'))} "
            f"| {_pct(r.get('coverage'))} | {r['runs']} × {r['epochs']} |")
    lines += ["", "Accuracy: mean ± std over independently initialised evaluation networks "
              "(the set itself is the final one; nothing is chosen by test accuracy). Easy/hard: "
              "the test halves with lower/higher EL2N under a trained expert. Coverage: share of "
              "test samples whose expert feature lies within r of a synthetic image, r = mean "
              "nearest-neighbour distance among real training features.", ""]
    window = data["window"]
    if window:
        storage.write_bytes(storage.join(run_dir, "report_beta.png"), beta_curve_png(window))
        lines += ["## Window search", "",
                  f"{window['metric'].capitalize()} (held-out {window['validation_size']} training "
                  f"images) after {window['epochs']} epochs per β; best β = {window['best_beta']:g}.",
                  "", "![beta curve](report_beta.png)", "",
                  "| β | " + " | ".join(f"{b:g}" for b in window["betas"]) + " |",
                  "| --- |" + " --- |" * len(window["betas"]),
                  "| acc (%) | " + " | ".join(f"{100 * a:.1f}" for a in window["val_accuracy"]) + " |",
                  ""]
    grids = [m for m in data["methods"] if storage.exists(storage.join(run_dir, "synset", f"{m}.png"))]
    if grids:
        lines += ["## Synthetic sets", "",
                  "One column per class; frozen (selected) rows on top, distilled rows below.", ""]
        for m in grids:
            lines += [f"**{METHOD_LABEL.get(m, m)}**", "", f"![{m}](synset/{m}.png)", ""]
    lines += ["## Configuration", "", "```yaml", config_text.rstrip(), "```", ""]
    url = storage.join(run_dir, "report.md")
    storage.write_text(url, "\n".join(lines))
    return url

