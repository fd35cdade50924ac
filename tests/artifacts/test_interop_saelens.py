"""lit-sae's exports of every architecture load in the real SAELens (its own venv, Python 3.11, made by
scripts/check_interop.sh) and reconstruct as lit-sae does: relu as StandardSAE, jumprelu with its per-latent
thresholds, batchtopk and matryoshka BatchTopK as JumpReLUSAE; and SAELens's saves load in lit-sae. Skipped when the
venv is absent: set LIT_SAE_INTEROP_DIR to the folder check_interop.sh installs into (default runs/interop)."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
INTEROP = Path(os.environ.get("LIT_SAE_INTEROP_DIR", ROOT / "runs" / "interop"))
PYTHON = INTEROP / "venvs" / "saelens" / "bin" / "python"


@pytest.mark.skipif(not PYTHON.is_file(), reason=f"no SAELens venv at {PYTHON} (run scripts/check_interop.sh)")
def test_every_architecture_round_trips_through_real_saelens(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"acts": torch.randn(256, 64, generator=g) + 3}, str(tmp_path / "test_acts.safetensors"))
    run = subprocess.run([str(PYTHON), "-W", "ignore", str(ROOT / "scripts" / "interop_roundtrip.py"), "--lib",
                          "saelens", "--work", str(tmp_path), "--d-in", "64"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    for name, cls in [("relu", "StandardSAE"), ("jumprelu", "JumpReLUSAE"), ("batchtopk", "JumpReLUSAE"),
                      ("matryoshka_batchtopk", "JumpReLUSAE"), ("topk", "TopKSAE")]:
        line = next(ln for ln in out.splitlines() if ln.startswith(f"ok   lit-sae {name} save_pretrained"))
        assert f"; {cls}," in line, line
    assert "PASS saelens" in out
