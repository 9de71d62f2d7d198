"""Quoted figures cannot go stale: every number README.md and docs/ quote from a recorded result
is written as a link to its file in bench/results/ (``[96.31 ± 0.46](bench/results/quickstart.md)``),
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
    good = "random selection [96.31 ± 0.46](bench/results/quickstart.md)"
    assert quoted("README.md", good) == [("96.31 ± 0.46", "bench/results/quickstart.md", "")]
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
