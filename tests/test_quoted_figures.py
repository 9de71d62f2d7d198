"""Quoted figures cannot go stale: every number README.md and docs/ quote from a recorded result
is written as a link to its file in bench/results/ (``[96.31 ± 0.46](bench/results/quickstart_9b0ed04.md)``),
and the linked file must contain the link's text verbatim. Re-recording a result without updating
what quotes it fails here."""

from __future__ import annotations

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\[([^\[\]]*\d[^\[\]]*)\]\(([^)\s]+)\)")  # [text with a digit](target)


def _normalise(text: str) -> str:
    return " ".join(text.replace("**", "").replace("`", "").split())


def quoted(doc: str, text: str) -> list[tuple[str, str, str]]:
    """(figure, source path, problem or '') for every quote of ``text``, a markdown file at
    ``doc`` (a path in the repository)."""
    out = []
    for figure, target in LINK.findall(text):
        path = os.path.normpath(os.path.join(os.path.dirname(doc), target.split("#")[0]))
        if not path.startswith(os.path.join("bench", "results") + os.sep):
            continue
        full = os.path.join(REPO, path)
        if not os.path.exists(full):
            out.append((figure, path, "the linked source does not exist"))
            continue
        with open(full, encoding="utf-8") as f:
            source = _normalise(f.read())
        out.append((figure, path, "" if _normalise(figure) in source else
                    "not found in the source: quoted from an older record?"))
    return out


def documents() -> list[str]:
    docs = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(
        os.path.join(REPO, "docs"))) if n.endswith(".md")]
    return docs


@pytest.mark.parametrize("doc", documents())
def test_every_quoted_figure_is_in_its_source(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        problems = [f"{doc}: {fig!r} → {src}: {why}" for fig, src, why in quoted(doc, f.read())
                    if why]
    assert not problems, "\n".join(problems)


def test_the_readme_quotes_its_results():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        found = quoted("README.md", f.read())
    assert len(found) >= 4 and all(not why for _, _, why in found)


def test_a_changed_figure_is_caught():
    """The check itself: one digit changed in a quote of a real record fails."""
    good = "random selection [96.31 ± 0.46](bench/results/quickstart_9b0ed04.md)"
    assert quoted("README.md", good) == [("96.31 ± 0.46", "bench/results/quickstart_9b0ed04.md", "")]
    (_, _, why), = quoted("README.md", good.replace("96.31", "96.32"))
    assert "not found in the source" in why
    # an interval written in prose ("t in [0, T)") is not the start of a link
    assert quoted("README.md", "t ∈ [0, T⁺) and " + good) == quoted("README.md", good)
    (_, _, why), = quoted("docs/x.md", "[1.0](../bench/results/nothing_here.md)")
    assert "does not exist" in why


@pytest.mark.parametrize("doc", documents())
def test_every_local_link_resolves(doc):
    """A moved or renamed page or record breaks no link of README.md or docs/."""
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        targets = re.findall(r"\]\(([^)\s]+)\)", f.read())
    broken = [t for t in targets if not t.startswith(("http://", "https://", "#")) and
              not os.path.exists(os.path.join(REPO, os.path.dirname(doc), t.split("#")[0]))]
    assert not broken, f"{doc}: {broken}"


COLUMN_ROWS = {
    "random selection": ("Random selection",),
    "mtt": ("MTT (random init, full update)",),
    "selmatch (dsa eval)": ("SelMatch's start + partial update (DSA eval)",
                            "Select init + partial update (DSA eval)"),  # its earlier name
    "selmatch (combined)": ("SelMatch (combined augmentation)",),
}
"""A results table's column (README.md) -> the row of the recorded report that it quotes (by
its label now, and in records made before it was renamed)."""

_IPC = re.compile(r"\bIPC (\d+)\b")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_quotes(doc: str, text: str) -> list[tuple[str, str, str, str]]:
    """(row label, column header, figure, source path) of every figure quoted in a table cell
    whose column is a report row (COLUMN_ROWS)."""
    out, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        for column, cell in zip(header, cells):
            if column in COLUMN_ROWS:
                for figure, path, _ in quoted(doc, cell):
                    out.append((cells[0], column, figure, path))
    return out


def source_rows(path: str) -> list[tuple[str, list[str]]]:
    """(the heading above it, cells) of every table row of a recorded result."""
    out, heading = [], ""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                heading = line.strip("# \n")
            elif line.startswith("|"):
                out.append((heading, [_normalise(c) for c in _cells(line)]))
    return out


def row_problem(label: str, column: str, figure: str, path: str) -> str:
    """'' when ``figure`` is in the source's row for ``column``, under the heading of the same
    IPC as the quoting row's label (when the source's headings name IPCs)."""
    rows = source_rows(path)
    ipc = _IPC.search(label)
    if ipc and any(_IPC.search(h) for h, _ in rows):
        rows = [(h, c) for h, c in rows if (m := _IPC.search(h)) and m.group(1) == ipc.group(1)
                and "uncapped" not in h.lower()]
    want = COLUMN_ROWS[column]
    cells = [c for _, c in rows if c and c[0] in want]
    # a summary table whose first cell is the setting (its IPC) and second the row
    cells += [c for _, c in rows if len(c) > 1 and c[1] in want and _IPC.search(c[0])
              and ipc and _IPC.search(c[0]).group(1) == ipc.group(1) and "|" not in c[0]]
    if not cells:
        return f"no row {want[0]!r}" + (f" under an IPC {ipc.group(1)} heading" if ipc else "")
    if not any(_normalise(figure) in c for c in cells):
        return f"{figure!r} is not the {want[0]!r} row's figure (the row has {cells[0][1:6]})"
    return ""


def test_each_figure_in_a_results_table_is_its_rows_figure():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        found = table_quotes("README.md", f.read())
    assert len(found) >= 12
    problems = [f"{label} / {column}: {why}" for label, column, figure, path in found
                if (why := row_problem(label, column, figure, path))]
    assert not problems, "\n".join(problems)


def test_a_figure_quoted_in_the_wrong_cell_is_caught():
    """A figure copied into the wrong column or row is in the file, but not in that row."""
    src = "bench/results/fmnist_cpu_tables.md"
    assert row_problem("Fashion-MNIST, IPC 50 (5%)", "random selection", "81.55 ± 0.86", src) == ""
    assert "not the 'MTT" in row_problem("Fashion-MNIST, IPC 50 (5%)", "mtt", "81.55 ± 0.86", src)
    # IPC 100's random selection quoted in the IPC 50 row
    assert row_problem("Fashion-MNIST, IPC 50 (5%)", "random selection", "84.88 ± 0.14", src)
    # a summary whose rows are (setting, row, ...): the IPC of the setting cell counts
    starts = "bench/results/fmnist_starts.md"
    assert row_problem("Fashion-MNIST, IPC 100", "random selection", "84.74 ± 0.26", starts) == ""
    assert row_problem("Fashion-MNIST, IPC 50", "random selection", "84.74 ± 0.26", starts)
