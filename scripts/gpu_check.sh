#!/usr/bin/env bash
# One prepared GPU check, runnable on a bare CUDA machine with no network: Python 3.12 as `python3` with a CUDA torch,
# lightning, torchmetrics, transformers, safetensors, tensorboard (no `python`, no .venv).
#   1. installs lit-sae's other dependencies from the wheels in $WHEELS (default .gpu_wheels, made beforehand on a
#      machine with PyPI by scripts/gpu_wheels.sh) into a private folder, and puts the repository on PYTHONPATH;
#   2. runs the kernel equivalence tests (float64 fast path vs the dense reference, forward and gradients; CPU and
#      CUDA parametrisations) and the sparse-SAE tests;
#   3. runs scripts/benchmark.py in bf16 autocast at n_latents 2^15..2^20 with batch 131,072 tokens (steady k = 32),
#      plus AuxK's worst case and Multi-TopK at n 2^16: tokens/s, peak memory, ratio to one bf16 encoder matmul;
#   4. an end-to-end `python3 -m lit_sae fit` of configs/synthetic.yaml on CUDA in bf16-mixed, then `test` on its
#      checkpoint (the Lightning module, callbacks, export and report on a GPU).
# Budget: about 5 minutes on one H100/H200-class GPU. Results go to $OUT (or ./gpu_check_out): log, bench JSON.
# Usage: scripts/gpu_wheels.sh  (here, once: fills the ignored .gpu_wheels/, ~1.4 MB; carry it to the GPU machine)
#        scripts/gpu_check.sh [--dry-run]      (there: bash scripts/gpu_check.sh, from any directory)
#   --dry-run  everything short of CUDA: install, import, the benchmark's plan; exits before tests and timings.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$a' (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.gpu_wheels}
OUTDIR=${OUT:-gpu_check_out}
SITE=${LIT_SAE_SITE:-${TMPDIR:-/tmp}/lit_sae_site}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1

# 1. dependencies: only what the image lacks, from local wheels, no index, no network.
missing=$("$PY" - <<'PYEOF'
import importlib.util
print(" ".join(m for m in ("webdataset", "omegaconf", "jsonargparse", "braceexpand", "docstring_parser",
                           "typeshed_client") if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_check.sh: missing modules ($missing) and no wheels in $WHEELS:" \
    "run scripts/gpu_wheels.sh on a machine with PyPI first" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import sys, torch
import lit_sae.sae.kernels, lit_sae.sae.model, lit_sae.train.module, lit_sae.data.datamodule, lit_sae.data.harvest  # noqa: F401
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF

BENCH=(scripts/benchmark.py --device cuda --batch 131072 --steps 5)
PLAN_N=(steady:32768:32 steady:65536:32 steady:131072:32 steady:262144:32 steady:524288:32 steady:1048576:32)
PLAN_R=(auxk:65536:32 multi:65536:32 steady:65536:128)
if [ "$DRY" = 1 ]; then
  "$PY" scripts/benchmark.py --device cuda --batch 131072 --plan "${PLAN_N[@]}" "${PLAN_R[@]}" --list
  echo "dry run: would run pytest tests/sae/test_kernels.py tests/sae/test_sae.py, then ${BENCH[*]} --plan ..."
  exit 0
fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: torch sees no CUDA device")'

# 2. equivalence tests (float64, CPU and CUDA parametrisations)
status=0  # a failed test is reported, and the timings still run
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/sae/test_kernels.py tests/sae/test_sae.py 2>&1 | tee "$OUTDIR/tests.log" \
  || status=1
# 3. the benchmark, bf16 autocast; one subprocess per configuration (its own peak memory)
timeout 280 "$PY" "${BENCH[@]}" --plan "${PLAN_N[@]}" "${PLAN_R[@]}" --json "$OUTDIR/bench_gpu.json" \
  2>&1 | tee "$OUTDIR/bench.log" || status=1
# 4. end to end on CUDA: a short synthetic fit in bf16-mixed, then test on its last checkpoint
RUN="${TMPDIR:-/tmp}/lit_sae_gpu_fit"
rm -rf "$RUN"
{ timeout 100 "$PY" -m lit_sae fit --config configs/synthetic.yaml --trainer.accelerator cuda --trainer.devices 1 \
    --trainer.precision bf16-mixed --trainer.max_steps 600 --trainer.val_check_interval 300 \
    --trainer.default_root_dir "$RUN" \
  && timeout 50 "$PY" -m lit_sae test --config "$RUN/config.yaml" --ckpt_path last; } 2>&1 | tee "$OUTDIR/fit.log" || status=1
exit $status
