#!/usr/bin/env bash
# Create .venv if missing, install Likeness with its test extras, build the tiny models.
# Idempotent: a second run only checks. Uses torch 2.14.1 + torchvision 0.29.1 (pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.likeness-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev,ray]'
  # The peer of tests/backends/test_ksampling.py: k-diffusion itself, without its training/eval
  # dependencies (dctorch pins numpy<2, clip-anytorch needs pkg_resources); the test imports only
  # k_diffusion.sampling and k_diffusion.external, which need torchsde, torchdiffeq and scipy.
  .venv/bin/python -m pip install -q --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5
  touch "$stamp"
fi
HF_HUB_OFFLINE=1 .venv/bin/python scripts/build_tiny_models.py
