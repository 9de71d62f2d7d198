"""The installed top-level packages ``distill``, ``launch`` and ``tune`` neither shadow nor are
shadowed: ``tune/searcher.py`` does ``from ray import tune`` inside our package ``tune``.

Absolute imports keep ``tune`` (ours) and ``ray.tune`` apart in one process, whichever is
imported first; no other installed distribution provides a top-level module of the same name;
and no module file of the three packages is named like a top-level module that could be imported
by name (stdlib or installed), which is what a package directory on ``sys.path`` (a file run as
a script) would shadow.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "launch", "tune")

CHECK = f"""
import sys
{{first}}
import distill, launch, tune, tune.main, tune.searcher
from ray import tune as ray_tune
repo = {str(REPO)!r}
assert tune.__file__.startswith(repo + "/tune/"), tune.__file__
assert sys.modules["tune"] is tune and sys.modules["ray.tune"] is ray_tune
assert ray_tune.__name__ == "ray.tune" and hasattr(ray_tune, "Tuner")
assert tune.searcher.tune is ray_tune and tune.main.run_tune.__module__ == "tune.main"
assert distill.__file__.startswith(repo) and launch.__file__.startswith(repo)
print("ok")
"""


@pytest.mark.parametrize("first", ["import tune.searcher", "import ray.tune"],
                         ids=["ours_first", "ray_first"])
def test_tune_and_ray_tune_live_side_by_side(first):
    pytest.importorskip("ray.tune")
    out = subprocess.run([sys.executable, "-c", CHECK.format(first=first)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_no_other_distribution_provides_our_top_level_names():
    provided = importlib.metadata.packages_distributions()
    for name in PACKAGES:
        assert set(provided.get(name, [])) <= {"selmatch"}, (name, provided.get(name))


def test_no_module_is_named_like_an_importable_top_level_module():
    stems = {p.stem for pkg in PACKAGES for p in (REPO / pkg).glob("*.py")}
    stems -= {"__init__", "__main__"}
    taken = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())
    assert not stems & taken, sorted(stems & taken)
    assert not stems & set(PACKAGES)  # e.g. a launch/tune.py would shadow our tune
