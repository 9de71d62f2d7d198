#!/usr/bin/env bash
# Fresh machine -> installed selmatch -> the whole pipeline on the embedded digits data.
#   bash launch/quickstart.sh            (venv in .venv; artifacts and report in runs/quickstart)
# Re-running reuses the venv and skips every finished stage.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh .venv
.venv/bin/selmatch run --config configs/quickstart.yaml
