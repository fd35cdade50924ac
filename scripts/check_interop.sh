#!/usr/bin/env bash
# Round-trip SAEs (and transcoders) between lit-sae and the real SAELens, EleutherAI sparsify and circuit-tracer, installed from the package index into
# their own venvs (kept out of lit-sae's venv and test suite; about 1.9 GB and 1.5 GB). Run from the repository root
# after `make install`:   bash scripts/check_interop.sh
#
# 1. their save -> lit_sae.load_sae, and lit-sae's export -> their loader, on the same inputs (interop_roundtrip.py);
# 2. `lit-sae test --model.init_from` scores an SAE saved by SAELens itself and one saved by sparsify itself on
#    lit-sae shards, and the score equals the NMSE the library's own forward gives on the same test activations.
# Prints PASS / FAIL per check; exit status 1 on any failure.
set -euo pipefail

ROOT=$(pwd)
DIR=${LIT_SAE_INTEROP_DIR:-runs/interop}   # runs/ is git-ignored
VENVS=$DIR/venvs
WORK=$DIR/work
LIT=${LIT_SAE_PYTHON:-.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}              # the CPU build first, so the libraries do not pull CUDA builds
D_IN=64
HOOK=blocks.2.hook_resid_post
export SPARSIFY_DISABLE_TRITON=1           # sparsify on CPU

install() {  # install <venv name> <package>
  local venv=$VENVS/$1
  if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
  if ! "$venv/bin/python" -c "import importlib.metadata as m; m.version('$2')" >/dev/null 2>&1; then
    echo "installing $2 into $venv (once)"
    "$venv/bin/pip" install -q "$TORCH" 2>&1 | grep -v "^WARNING: Location" || true
    "$venv/bin/pip" install -q "$2" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  echo "$2 $("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$2'))"), torch $("$venv/bin/python" -c "import torch; print(torch.__version__)")"
}

mkdir -p "$VENVS"
rm -rf "$WORK" && mkdir -p "$WORK"
install saelens sae-lens
install sparsify eai-sparsify
install circuit-tracer circuit-tracer

echo "== lit-sae shards (d_in $D_IN, $HOOK) and their test activations"
"$LIT" - "$WORK" $D_IN $HOOK <<'EOF'
import sys
import torch
from safetensors.torch import save_file
from lit_sae.data.shards import FORMAT, ShardWriter, write_manifest_atomic

work, d_in, hook = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = f"{work}/shards"
g = torch.Generator().manual_seed(0)
man = {"format": FORMAT, "d_in": d_in, "dtype": "float16", "block_tokens": 256, "tokens_per_shard": 1024,
       "context_length": 32, "hook_point": hook, "model": {"name_or_path": "synthetic-lm"}, "splits": {},
       "complete": True}
mean = torch.randn(d_in, generator=g) * 3
for i, (split, n) in enumerate({"train": 1024, "val": 256, "test": 1024}.items()):
    acts = (torch.randn(n, d_in, generator=g) + mean).half()
    ids = torch.arange(n) + 10_000 * i
    infos = []
    with ShardWriter(out, split, d_in, "float16", 256, 1024, on_shard=infos.append) as w:
        w.add(acts, ids % 1000, ids // 32, ids % 32)
    man["splits"][split] = {"shards": infos, "tokens": n, "contexts": n // 32}
    if split == "test":
        save_file({"acts": acts.float()}, f"{work}/test_acts.safetensors")
write_manifest_atomic(out, man)
print(f"wrote {out}")
EOF

status=0
for lib in saelens sparsify; do
  echo "== $lib: both directions"
  PYTHONPATH=$ROOT "$VENVS/$lib/bin/python" -W ignore scripts/interop_roundtrip.py --lib "$lib" --work "$WORK" \
    --d-in $D_IN --hook $HOOK 2>&1 | grep -v -E "^(Dropping extra args|Triton not installed)" || status=1
done

for lib in saelens sparsify; do
  echo "== lit-sae test --model.init_from <SAE saved by $lib>"
  theirs=$(PYTHONPATH=$ROOT "$VENVS/$lib/bin/python" -W ignore - "$WORK" "$lib" <<'EOF' 2>/dev/null
import sys
import torch
from safetensors.torch import load_file
work, lib = sys.argv[1], sys.argv[2]
x = load_file(f"{work}/test_acts.safetensors")["acts"]
with torch.no_grad():
    if lib == "saelens":
        from sae_lens import SAE
        sae = SAE.load_from_disk(f"{work}/for_test/saelens")
        x_hat = sae.decode(sae.encode(x))
    else:
        from sparsify import SparseCoder
        sc = SparseCoder.load_many(f"{work}/for_test/sparsify", local=True)
        sae = next(iter(sc.values()))
        enc = sae.encode(x)
        x_hat = sae.decode(enc.top_acts, enc.top_indices)
x, x_hat = x.double(), x_hat.double()
print(float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()))
EOF
)
  theirs=$(echo "$theirs" | tail -1)  # sparsify prints a note about triton first
  log=$WORK/test_$lib.log
  if "$ROOT/.venv/bin/lit-sae" test --data.class_path lit_sae.data.datamodule.ActivationDataModule \
      --data.init_args.path "$WORK/shards" --data.init_args.num_workers 0 --data.init_args.batch_size_tokens 256 \
      --model.n_latents $((4 * D_IN)) --model.k 8 --model.init_from "$WORK/for_test/$lib" \
      --trainer.logger false --trainer.enable_progress_bar false --trainer.default_root_dir "$WORK/run_$lib" \
      >"$log" 2>&1; then
    ours=$(grep -oE "test/nmse[^0-9]*[0-9.eE+-]+" "$log" | grep -oE "[0-9][0-9.eE+-]*$" | tail -1)
    if "$LIT" -c "import sys; a, b = float('$ours'), float('$theirs'); sys.exit(abs(a - b) > 1e-5 * max(1, b))"; then
      echo "ok   lit-sae test test/nmse $ours == $lib's own forward on the same test activations $theirs"
    else
      echo "FAIL lit-sae test test/nmse $ours != $lib's own forward $theirs"; status=1
    fi
  else
    echo "FAIL lit-sae test on the $lib SAE (see $log):"; tail -5 "$log"; status=1
  fi
done

# 3. transcoders: lit-sae's SAELens / circuit-tracer transcoder exports load in the real packages with the same
#    prediction of the target, and the packages' own saves load in lit-sae (scripts/interop_transcoders.py).
for lib in saelens circuit-tracer; do
  echo "== $lib: transcoders, both directions"
  PYTHONPATH=$ROOT "$VENVS/$lib/bin/python" -W ignore scripts/interop_transcoders.py --lib "$lib" --work "$WORK" \
    2>&1 | grep -v -E "^(Dropping extra args)" || status=1
done

if [ $status -eq 0 ]; then echo "PASS check_interop"; else echo "FAIL check_interop"; fi
exit $status
