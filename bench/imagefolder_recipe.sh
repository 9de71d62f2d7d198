#!/usr/bin/env bash
# docs/data.md's image-folder recipe, at its full budgets, on a generated folder of shapes
# (tests/helpers.py write_shapes: 3 classes x PER_CLASS training + 0.3 PER_CLASS validation PNGs of
# 32x32: filled circles, squares and triangles of random size, place and colour on noisy
# gradients). Prints the report's path; bench/results/imagefolder_recipe.md records one run.
#
#   bash bench/imagefolder_recipe.sh [ROOT] [PER_CLASS]      # ROOT default runs/imagefolder_recipe
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-runs/imagefolder_recipe}"
per_class="${2:-100}"
python - "$root/my_images" "$per_class" <<'PY'
import pathlib, sys
sys.path.insert(0, "tests")
from helpers import write_shapes
write_shapes(pathlib.Path(sys.argv[1]), per_class=int(sys.argv[2]), val=int(sys.argv[2]) * 3 // 10)
PY
python -m launch.cli run --config configs/quickstart.yaml --run_dir "$root/run" \
  --data.name imagefolder --data.root "$root/my_images" \
  --data.options.image_size 32 --distill.batch_syn null --distill.bn_group null \
  --experts.epochs 30 --experts.lr 0.03 --experts.batch_size 32
