#!/usr/bin/env bash
# Create a virtual environment and install selmatch with every extra (Ray, DeepSpeed,
# TensorBoard, tests).
#   bash launch/setup.sh [VENV_DIR]        (default .venv)
# torch is pinned first so pip does not pick a different (multi-GB) build while resolving.
set -euo pipefail
venv="${1:-.venv}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
# a regular install (an editable one always prints setuptools' "Editable installation" warning);
# for development use `pip install -e .` instead, so that code changes need no reinstall
"$venv/bin/python" -m pip install -q "$here[ray,deepspeed,tensorboard,dev]"
echo "selmatch installed in $venv"
