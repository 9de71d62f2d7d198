#!/usr/bin/env bash
# Fresh machine -> installed selmatch -> the quickstart job on the embedded digits data.
#   bash launch/quickstart.sh            (venv in .venv; artifacts in runs/quickstart)
# Re-running reuses the venv and the experts already trained (scores and distillation are redone).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh .venv
.venv/bin/selmatch experts --config configs/quickstart.yaml
.venv/bin/selmatch scores --config configs/quickstart.yaml
.venv/bin/selmatch distill --config configs/quickstart.yaml
echo "artifacts in runs/quickstart: experts/, scores/, synset/ (selmatch.pt/.png, window.pt/.png), logs/"
