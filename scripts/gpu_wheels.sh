#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that lit-sae needs beyond a CUDA image that already holds
# torch, triton, lightning, torchmetrics, transformers, safetensors, tensorboard, numpy, pandas, pyarrow, xxhash,
# pyyaml and pytest (CPython 3.12, manylinux x86-64). scripts/gpu_check.sh installs them from this folder without
# network. PYVER=3.11 fetches the same set for a Python 3.11 machine (the CPU dry run).
# Usage: scripts/gpu_wheels.sh [DIR]     (default .gpu_wheels, ignored by git; ~3 MB)
# OpenAI's sparse_autoencoder is not on PyPI: for the race, copy sparse_autoencoder/kernels.py of a checkout of
# github.com/openai/sparse_autoencoder to DIR/openai_kernels.py (gpu_check.sh passes it to scripts/race.py).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu_wheels}
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
mkdir -p "$DIR" "$DIR/peers"
GET=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Pure-Python wheels; --no-deps so that nothing the image already has is fetched again. The set: the import of
# lit_sae (webdataset, omegaconf, jsonargparse) and their own needs (braceexpand, docstring-parser, typeshed-client).
"${GET[@]}" -d "$DIR" "webdataset>=0.2.100,<2" braceexpand "omegaconf>=2.3,<3" "jsonargparse>=4.32,<4.54" \
  docstring-parser typeshed-client
# The race's peers (scripts/race.py), in their own folder: EleutherAI's sparsify and what its package import needs
# beyond the image (its __init__ imports its trainer: datasets, natsort, schedulefree, simple-parsing; datasets
# needs dill and multiprocess; einops is in the image, and here for the CPU dry run).
"${GET[@]}" -d "$DIR/peers" "eai-sparsify==1.3.3" "datasets==5.2.0" "natsort==8.4.0" "schedulefree==1.4.1" \
  "simple-parsing==0.1.9" "dill==0.4.1" "multiprocess==0.70.19" "einops==0.8.1"
# A CPU machine for the dry run may lack what the image ships and datasets imports (not carried to the GPU).
[ "$PYVER" = 3.12 ] || "${GET[@]}" -d "$DIR/peers" "pandas==2.3.3" "pyarrow==22.0.0" "xxhash==3.6.0" "pytz==2025.2" \
  "tzdata==2025.2"
ls "$DIR" "$DIR/peers"
du -sh "$DIR"
