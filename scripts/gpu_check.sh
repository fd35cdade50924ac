#!/usr/bin/env bash
# On a machine with a CUDA GPU: run the kernel equivalence tests (CPU and CUDA parametrisations) and the step
# benchmark (bf16 autocast on the GPU), and print the table. Budget: under 5 minutes on one H100-class GPU.
# Usage: scripts/gpu_check.sh            (from the repository root; uses .venv/bin/python when present)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device visible to torch " + torch.__version__)
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PYEOF
timeout 120 "$PY" -m pytest -q tests/test_kernels.py
# One timed run per configuration is enough on a GPU; 5 steps after a warm-up keep the whole table near a minute.
timeout 240 "$PY" scripts/benchmark.py --device cuda --steps 5 --json "${BENCH_JSON:-/tmp/lit_sae_gpu_bench.json}"
