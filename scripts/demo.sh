#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M over Python's own stdlib text), offline, on CPU:
# harvest activations -> fit the quickstart SAE -> evaluate -> feature browser -> say where everything went.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/demo
start=$(date +%s)

echo "== 1/4 harvest: SmolLM2-135M residual stream after layer 20 -> $OUT/shards"
lit-sae harvest --config configs/harvest/smollm2-demo.yaml

echo "== 2/4 fit: configs/quickstart.yaml"
resume=()  # a rerun continues the run in $OUT (a fresh fit into a used run folder is refused)
[ -e "$OUT/checkpoints/last.ckpt" ] && resume=(--ckpt_path last)
lit-sae fit --config configs/quickstart.yaml "${resume[@]}"

echo "== 3/4 test: the paper's evaluation suite on the held-out split"
lit-sae test --config configs/quickstart.yaml --config callbacks/eval.yaml --ckpt_path last

echo "== explain: SmolLM2-135M-Instruct explains ${AUTOINTERP_LATENTS:-8} latents, scored by detection and fuzzing"
lit-sae explain --ckpt_path "$OUT/checkpoints/last.ckpt" --n "${AUTOINTERP_LATENTS:-8}" --progress false

echo "== 4/4 features: the feature browser (N2G and the LLM explanations above)"
lit-sae features --ckpt_path "$OUT/checkpoints/last.ckpt" --out_dir "$OUT/features"
browser="$OUT/features/index.html"

report="$OUT/report.md"  # the run folder holds the report, next to checkpoints/ and sae/
[ -e "$report" ] || report=""
cat <<MSG

Done in $(( $(date +%s) - start )) s. Results:
  activation shards + manifest : $OUT/shards/
  checkpoints (resume: --ckpt_path last) : $OUT/checkpoints/
  exported SAE (SAELens layout): $OUT/sae/
  TensorBoard logs             : $OUT/   (tensorboard --logdir $OUT)
  evaluation report            : ${report:-<missing>} (and report.json beside it)
  feature browser (offline)    : $browser
  LLM explanations + scores    : $OUT/autointerp/ (results.json, explanations.json)
MSG
[ -n "$report" ] && cat "$report"
