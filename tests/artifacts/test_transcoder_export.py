"""Transcoder exports: SAELens's transcoder layout and circuit-tracer's per-layer file, read back by lit_sae.load_sae
with the same prediction; the layouts' formulas recomputed by hand from the written tensors; refusals that write
nothing; and (when scripts/check_interop.sh has made their venvs) the real SAELens and circuit-tracer."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_sae.artifacts.export import export_sae
from lit_sae.artifacts.load import load_sae
from lit_sae.sae.transcoder import Transcoder

ROOT = Path(__file__).resolve().parents[2]
INTEROP = Path(os.environ.get("LIT_SAE_INTEROP_DIR", ROOT / "runs" / "interop"))
HOOK_IN, HOOK_OUT = "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"
D = 16


def trained_like(activation="batchtopk", skip=True, d_out=D):
    torch.manual_seed(0)
    extra = {"sparsity_coef": 0.01} if activation in ("relu", "jumprelu") else {}
    tc = Transcoder(D, 48, 4, d_out=d_out, skip=skip, activation=activation, normalize="scalar", **extra)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, D, generator=g) * 3 + 2
    y = torch.randn(256, d_out, generator=g) * 0.5 - 1
    tc.init_from_data_(x, y)
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.3)
        if skip:
            tc.W_skip.normal_(0, 0.1)
        if activation == "jumprelu":
            tc.threshold.uniform_(-0.1, 0.3)  # a negative threshold acts as 0 in lit-sae: clamped on export
    tc.train()
    tc(x, target=y)
    return tc.eval(), x


def _close(a, b, ref):  # float32 export of float64-folded weights: a few ulps of the output's scale
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("activation,skip", [("batchtopk", True), ("relu", False), ("jumprelu", True)])
def test_both_layouts_load_back_with_the_same_prediction(tmp_path, activation, skip):
    tc, x = trained_like(activation, skip)
    y_hat = tc.reconstruct(x)
    export_sae(tc, tmp_path / "sl", hook_point=HOOK_IN, target_hook_point=HOOK_OUT)
    export_sae(tc, tmp_path / "ct", hook_point=HOOK_IN, target_hook_point=HOOK_OUT, format="circuit-tracer")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    arch = {"batchtopk": "jumprelu", "relu": "", "jumprelu": "jumprelu"}[activation]
    assert cfg["architecture"] == "_".join(filter(None, [arch, "skip" if skip else "", "transcoder"]))
    assert cfg["apply_b_dec_to_input"] is False and cfg["d_out"] == D and cfg["hook_name_out"] == HOOK_OUT
    for sub in ("sl", "ct"):
        back = load_sae(tmp_path / sub)
        assert isinstance(back, Transcoder) and back.skip == skip
        _close(back.reconstruct(x), y_hat, y_hat)
    # circuit-tracer's formula from the file: pre = x W_enc^T + b_enc; JumpReLU pre * (pre > t); z W_dec + b_dec + skip
    t = load_file(str(tmp_path / "ct" / "layer_2.safetensors"))
    pre = x @ t["W_enc"].T + t["b_enc"]
    thr = t.get("activation_function.threshold")
    z = pre * (pre > thr) if thr is not None else torch.relu(pre)
    y_ct = z @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)
    _close(y_ct, y_hat, y_hat)
    assert "feature_output_hook: \"hook_mlp_out\"" in (tmp_path / "ct" / "config.yaml").read_text()
    export_sae(tc, tmp_path / "ct", format="circuit-tracer", hook_point=HOOK_IN)  # re-export over its own files


@pytest.mark.parametrize("kw,fmt,key", [({"activation": "topk"}, "saelens", "model.activation"),
                                        ({"activation": "topk"}, "circuit-tracer", "model.activation"),
                                        ({"d_out": 8}, "circuit-tracer", "model.d_out")])
def test_a_layout_that_cannot_hold_the_variant_is_refused_and_nothing_written(tmp_path, kw, fmt, key):
    tc, _ = trained_like(**kw)
    with pytest.raises(ValueError, match=key):
        export_sae(tc, tmp_path / "out", hook_point=HOOK_IN, format=fmt)
    assert not (tmp_path / "out").exists()


def test_topk_transcoder_at_fit_end_is_kept_in_lit_sae_reading_of_the_layout(tmp_path):
    tc, x = trained_like("topk")
    export_sae(tc, tmp_path / "e", hook_point=HOOK_IN, strict=False)
    assert json.loads((tmp_path / "e" / "cfg.json").read_text())["architecture"] == "topk_skip_transcoder"
    back = load_sae(tmp_path / "e")
    _close(back.reconstruct(x), tc.reconstruct(x), tc.reconstruct(x))


@pytest.mark.slow
@pytest.mark.parametrize("lib,venv", [("saelens", "saelens"), ("circuit-tracer", "circuit-tracer")])
def test_real_packages_load_lit_sae_transcoders(tmp_path, lib, venv):
    python = INTEROP / "venvs" / venv / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no {lib} venv at {python} (run scripts/check_interop.sh)")
    run = subprocess.run([str(python), "-W", "ignore", str(ROOT / "scripts" / "interop_transcoders.py"), "--lib", lib,
                          "--work", str(tmp_path)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and f"PASS {lib} transcoders" in out, out[-4000:]
    assert out.count("ok  ") >= 8
