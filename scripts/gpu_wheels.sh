#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that lit-sae needs beyond a CUDA image that already holds
# torch, lightning, torchmetrics, transformers, safetensors, tensorboard, numpy, pyyaml and pytest (CPython 3.12,
# manylinux x86-64). scripts/gpu_check.sh installs them from this folder without network.
# Usage: scripts/gpu_wheels.sh [DIR]     (default .gpu_wheels, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu_wheels}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
# Pure-Python wheels; --no-deps so that nothing the image already has is fetched again. The set: the import of
# lit_sae (webdataset, omegaconf, jsonargparse) and their own needs (braceexpand, docstring-parser, typeshed-client).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
  "webdataset>=0.2.100,<2" braceexpand "omegaconf>=2.3,<3" "jsonargparse>=4.32,<4.54" docstring-parser \
  typeshed-client
ls "$DIR"
