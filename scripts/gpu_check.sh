#!/usr/bin/env bash
# One prepared GPU check, runnable on a bare CUDA machine with no network: Python 3.12 as `python3` with a CUDA torch,
# triton, lightning, torchmetrics, transformers, safetensors, tensorboard (no `python`, no .venv).
#   1. installs lit-sae's other dependencies from the wheels in $WHEELS (default .gpu_wheels, made beforehand on a
#      machine with PyPI by scripts/gpu_wheels.sh) into a private folder, the race's peers into another;
#   2. equivalence tests: the kernel tests (float64 fast path vs the dense reference, CPU and CUDA: on CUDA through
#      the Triton kernels), the Triton kernels natively on CUDA against the PyTorch path (bf16 selection, a bf16
#      step), then the CUDA cases again with LIT_SAE_KERNELS=torch;
#   3. scripts/benchmark.py in bf16 autocast, batch 131,072 tokens, every regime of the speed targets (steady at
#      n_latents 2^15..2^20, AuxK's worst case, Multi-TopK, k 128) with the Triton kernels (the default on CUDA): step
#      time, tokens/s, peak memory, ratio to one bf16 encoder matmul; then d_in 2304, and the PyTorch path
#      (LIT_SAE_KERNELS=torch) at three of them for the before / after in the same run;
#   4. scripts/race.py: lit-sae against EleutherAI's sparsify (Triton decoder) and OpenAI's kernels.py (when
#      $WHEELS/openai_kernels.py exists) on the same batch and shapes, n_latents 32,768 and 131,072;
#   5. an end-to-end `python3 -m lit_sae fit` of configs/synthetic.yaml on CUDA in bf16-mixed, then `test`.
# Budget: about 8 minutes on one H100/H200-class GPU (each part has its own timeout). Results go to $OUT (or
# ./gpu_check_out): logs, bench_*.json, race.json.
# Usage: scripts/gpu_wheels.sh  (here, once: fills the ignored .gpu_wheels/, ~3 MB; carry it to the GPU machine)
#        scripts/gpu_check.sh [--dry-run]      (there: bash scripts/gpu_check.sh, from any directory)
#   --dry-run  everything a CPU can run: install, import, the Triton kernels' interpreter tests and their sm_90
#              compile check, the benchmark's plan and its CPU mode (--quick), the race's imports and a tiny
#              interpreted step of each peer; no CUDA timings.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,23p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$a' (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.gpu_wheels}
OUTDIR=${OUT:-gpu_check_out}
SITE=${LIT_SAE_SITE:-${TMPDIR:-/tmp}/lit_sae_site}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
unset LIT_SAE_KERNELS TRITON_INTERPRET

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
PEER_PATH=$PYTHONPATH  # the race's peers go on the path of the race only
if ls "$WHEELS"/peers/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/peers" \
    "$WHEELS"/peers/*.whl
  PEER_PATH="$PYTHONPATH:$SITE/peers"
fi
OPENAI=()
[ -f "$WHEELS/openai_kernels.py" ] && OPENAI=(--openai-kernels "$WHEELS/openai_kernels.py")
"$PY" - <<'PYEOF'
import importlib.util, sys, torch
import lit_sae.sae.kernels, lit_sae.sae.model, lit_sae.train.module, lit_sae.data.datamodule, lit_sae.data.harvest  # noqa: F401
triton = importlib.util.find_spec("triton") and __import__("triton")
print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton and triton.__version__,
      "| cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF

BENCH=(scripts/benchmark.py --device cuda --batch 131072 --steps 3)
PLAN_N=(steady:32768:32 steady:65536:32 steady:131072:32 steady:262144:32 steady:1048576:32)
PLAN_R=(auxk:65536:32 multi:65536:32 steady:65536:128)
PLAN_BASE=(steady:131072:32 auxk:65536:32 multi:65536:32)
status=0  # a failed part is reported, and the others still run
if [ "$DRY" = 1 ]; then
  "$PY" scripts/benchmark.py --device cuda --batch 131072 --plan "${PLAN_N[@]}" "${PLAN_R[@]}" --list
  "$PY" -m lit_sae.sae.triton_kernels.compile_check 2>&1 | tee "$OUTDIR/compile_check.log" || status=1
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/sae/test_triton_kernels.py 2>&1 | tee "$OUTDIR/tests.log" \
    || status=1
  timeout 300 "$PY" scripts/benchmark.py --device cpu --quick --json "$OUTDIR/bench_cpu.json" 2>&1 \
    | tee "$OUTDIR/bench.log" || status=1
  TRITON_INTERPRET=1 PYTHONPATH="$PEER_PATH" timeout 300 "$PY" scripts/race.py --dry-run "${OPENAI[@]}" \
    --json "$OUTDIR/race.json" 2>&1 | tee "$OUTDIR/race.log" || status=1
  echo "dry run: CUDA parts skipped (tests -k cuda, ${BENCH[*]} --plan ..., scripts/race.py, lit_sae fit); status $status"
  exit $status
fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: torch sees no CUDA device")'

# 2. equivalence tests: Triton kernels on CUDA (the default), then the CUDA cases on the PyTorch path
# (the interpreter cases are CPU work, already run by the dry run and `make test`: skipped here for time)
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/sae/test_kernels.py tests/sae/test_sae.py \
  tests/sae/test_triton_kernels.py -k "not test_triton_kernel_case" 2>&1 | tee "$OUTDIR/tests.log" || status=1
LIT_SAE_KERNELS=torch timeout 40 "$PY" -m pytest -q -p no:cacheprovider tests/sae/test_kernels.py -k cuda 2>&1 \
  | tee "$OUTDIR/tests_torch.log" || status=1
# 3. the benchmark, bf16 autocast; one subprocess per configuration (its own peak memory)
timeout 170 "$PY" "${BENCH[@]}" --plan "${PLAN_N[@]}" "${PLAN_R[@]}" --json "$OUTDIR/bench_triton.json" \
  2>&1 | tee "$OUTDIR/bench.log" || status=1
timeout 40 "$PY" "${BENCH[@]}" --d-in 2304 --plan steady:131072:32 --json "$OUTDIR/bench_triton_d2304.json" \
  2>&1 | tee -a "$OUTDIR/bench.log" || status=1
LIT_SAE_KERNELS=torch timeout 60 "$PY" "${BENCH[@]}" --plan "${PLAN_BASE[@]}" --json "$OUTDIR/bench_torch.json" \
  2>&1 | tee -a "$OUTDIR/bench.log" || status=1
# 4. the race: same batch, same shapes
PYTHONPATH="$PEER_PATH" timeout 120 "$PY" scripts/race.py --device cuda --batch 131072 --n-latents 32768 131072 \
  "${OPENAI[@]}" --json "$OUTDIR/race.json" 2>&1 | tee "$OUTDIR/race.log" || status=1
# 5. end to end on CUDA: a short synthetic fit in bf16-mixed, then test on its last checkpoint
RUN="${TMPDIR:-/tmp}/lit_sae_gpu_fit"
rm -rf "$RUN"
{ timeout 60 "$PY" -m lit_sae fit --config configs/synthetic.yaml --trainer.accelerator cuda --trainer.devices 1 \
    --trainer.precision bf16-mixed --trainer.max_steps 300 --trainer.val_check_interval 150 \
    --trainer.default_root_dir "$RUN" \
  && timeout 30 "$PY" -m lit_sae test --config "$RUN/config.yaml" --ckpt_path last; } 2>&1 | tee "$OUTDIR/fit.log" || status=1
exit $status
