"""docs/data.md's recipe for a folder of one's own images runs to the report: the command is read
from the page (so the page and the test cannot drift apart), pointed at a generated folder of
shapes (tests/helpers.py: filled circles, squares and triangles of random size, place and colour
on gradients with pixel noise), and only its budgets are scaled down (iterations, epochs, seeds,
experts): every setting that decides whether the distillation is stable is the page's."""

from __future__ import annotations

import json
import os
import re
import shlex

import torch

from helpers import SHAPES, write_shapes
from launch.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# budgets only: fewer experts, seeds, iterations and epochs than the recipe's run
SCALED = ["--experts.num_experts", "2", "--seeds", "0", "--distill.iterations", "10",
          "--eval.epochs", "20", "--eval.runs", "1", "--tune.eval_runs", "1",
          "--tune.beta_step", "0.25"]


def recipe() -> list[str]:
    """The arguments of the `selmatch run` command in docs/data.md's image-folder section."""
    with open(os.path.join(REPO, "docs", "data.md")) as f:
        page = f.read()
    section = page[page.index("### Your own images"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    args = shlex.split(block.replace("\\\n", " "))
    assert args[:2] == ["selmatch", "run"], args
    return args[1:]


def test_the_image_folder_recipe_runs_to_the_report(tmp_path, capsys):
    data = tmp_path / "my_images"
    write_shapes(data, per_class=60, val=15)
    args = [a.replace("~/my_images", str(data)) for a in recipe()]
    args = [os.path.join(REPO, a) if a.startswith("configs/") else a for a in args]
    run_dir = tmp_path / "run"
    rc = main([*args, "--run_dir", str(run_dir), "--workers", "0", *SCALED])
    assert rc == 0, capsys.readouterr().err[-3000:]
    report = (run_dir / "report.md").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["methods"] and all(0 <= m["mean"] <= 1 for m in results["methods"].values())
    assert "selmatch" in results["methods"] and "SelMatch (combined augmentation)" in report
    record = json.loads((run_dir / "data.json").read_text())
    assert record["class_names"] == sorted(SHAPES) and record["image_shape"] == [3, 32, 32]
    # the learned student learning rate stayed positive and moved gradually in every distillation
    for name in ("selmatch", "mtt"):
        state = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
        lrs = [h["syn_lr"] for h in state["history"]]
        assert len(lrs) == 10 and min(lrs) > 0, (name, lrs)
        assert max(abs(b - a) / a for a, b in zip(lrs, lrs[1:])) <= 0.5, (name, lrs)
