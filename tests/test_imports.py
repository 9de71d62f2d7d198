"""The project's import graph: no cycle, and the layering the code relies on (distill/ below launch/ and tune/).

Every ``import`` statement counts, also one inside a function (a cycle "closed" by a
function-level import is still a cycle: whichever module loads first sees the other half-built),
and so does a handler named as a ``"package.module:function"`` string that is imported on
demand (launch/cli.py's COMMANDS): a handler that imports the module dispatching to it closes a
cycle too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "launch", "tune", "selmatch")
_HANDLER = re.compile(r"^((?:distill|launch|tune)\.\w+):\w+$")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the installed packages and of bench/."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).glob("*.py")):
            mods[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    for path in sorted((REPO / "bench").glob("*.py")):
        mods[f"bench.{path.stem}"] = path
    return mods


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that module ``name`` imports anywhere in its file."""
    package = name.rsplit(".", 1)[0] if path.stem != "__init__" else name
    out: set[str] = set()

    def add(target: str) -> None:
        if name.startswith("bench.") and f"bench.{target}" in modules:  # bench scripts' siblings
            target = f"bench.{target}"
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:  # `from distill import storage` imports distill.storage
                full = f"{base}.{alias.name}"
                add(full if full in modules else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _HANDLER.match(node.value)
            if match:
                add(match.group(1))
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_and_handler_imports():
    graph = import_graph()
    assert "distill.validation" in graph["distill.config_io"]
    assert {"launch.experts", "tune.main"} <= graph["launch.cli"]  # COMMANDS' handler strings
    assert "bench.matching_probe" in graph["bench.matching"]


def test_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_config_is_a_leaf():
    assert import_graph()["distill.config"] == set()


ENTRY_SCRIPT = "distill.main"
"""``accelerate launch distill/main.py``: the path users type is part of the product's contract,
so the file stays in distill/; it is a script, not a library module (below)."""


def test_the_entry_script_is_a_script_and_nothing_imports_it():
    """distill/main.py only hands over to launch/distillation.py when run as a script: it defines
    nothing, nothing imports it, and the library modules beside it import nothing above them."""
    graph = import_graph()
    assert not [m for m, deps in graph.items() if ENTRY_SCRIPT in deps]
    assert graph[ENTRY_SCRIPT] == {"launch.distillation"}
    tree = ast.parse(project_modules()[ENTRY_SCRIPT].read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(body) == 1 and isinstance(body[0], ast.If), "only `if __name__ == '__main__':`"


@pytest.mark.parametrize("module", [m for m in project_modules()
                                    if m.startswith("distill.") and m != ENTRY_SCRIPT])
def test_distill_stays_below_launch_and_tune_and_away_from_ray(module):
    """distill/ never imports ray, and nothing but distill/runtime.py imports
    torch.distributed; the library does not reach up into launch/ or tune/."""
    path = project_modules()[module]
    tree = ast.parse(path.read_text(), str(path))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {n for n in names if n == "ray" or n.startswith("ray.")}
    if module != "distill.runtime":
        assert not {n for n in names if n.startswith("torch.distributed")}
    upward = {m for m in import_graph()[module] if m.startswith(("launch", "tune"))}
    assert not upward, upward


def test_the_python_api_is_the_top_layer():
    """selmatch/ (the Python API) sits over distill/, launch/ and tune/; none of them imports
    it, so the commands and the API share one implementation and neither depends on the other."""
    graph = import_graph()
    assert not [m for m, deps in graph.items() if "selmatch" in deps and m != "selmatch"]
    assert {"launch.pipeline", "launch.export", "distill.synset"} <= graph["selmatch"]
