"""Runs ``triton_cases.py`` (lit-sae's Triton kernels against float64 references) under the Triton interpreter.

The interpreter must be chosen before ``triton`` is first imported, and this process imported it already (lightning
does): the cases run in one subprocess with ``TRITON_INTERPRET=1``, so the variable never reaches other tests. Each
case function of that file is one test here, passing when all its parametrisations passed in the subprocess.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("triton_cases.py")
REPO = Path(__file__).resolve().parents[2]
NAMES = [f.name for f in ast.parse(CASES.read_text()).body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install 'lit-sae[test]' on Linux x86-64): Triton kernels not tested",
)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[tuple[str, str]]]:
    """{case function: [(outcome, message) per parametrisation]} from one interpreted pytest run of the cases."""
    report = tmp_path_factory.mktemp("triton_cases") / "report.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                          os.environ.get("PYTHONPATH")]))}
    env.pop("LIT_SAE_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES),
                           f"--junitxml={report}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if not report.exists():
        pytest.fail(f"the interpreted cases did not run (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    found: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
        outcome = bad[0].tag if bad else "passed"
        message = (bad[0].get("message", "") + "\n" + (bad[0].text or ""))[-2000:] if bad else ""
        found.setdefault(case.get("name").split("[")[0], []).append((outcome, message))
    return found


@pytest.mark.parametrize("name", NAMES)
def test_triton_kernel_case(outcomes, name):
    runs = outcomes.get(name)
    assert runs, f"{name} did not run in the interpreted subprocess"
    failed = [m for outcome, m in runs if outcome != "passed"]
    assert not failed, f"{name}: {len(failed)} of {len(runs)} parametrisations did not pass:\n" + "\n".join(failed)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process interprets Triton")
def test_forcing_triton_on_cpu_without_the_interpreter_names_the_fix(monkeypatch):
    """This process built the kernels natively (no interpreter): a forced Triton run on CPU tensors fails with one
    line that says how to run them, before any kernel launch."""
    from lit_sae.sae import kernels
    from lit_sae.sae.triton_kernels import dispatch

    monkeypatch.setenv(dispatch.ENV, "triton")
    with pytest.raises(RuntimeError, match="LIT_SAE_KERNELS=triton on a cpu tensor.*TRITON_INTERPRET=1"):
        kernels.topk_encode(torch.randn(4, 8), torch.randn(16, 8), torch.zeros(16), 2)
    monkeypatch.setenv(dispatch.ENV, "auto")
    assert kernels.topk_encode(torch.randn(4, 8), torch.randn(16, 8), torch.zeros(16), 2).indices.shape == (4, 2)


# ------------------------------------------------------------------------------------------------ CUDA (gpu_check.sh)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("K,k_aux", [(32, 0), (128, 0), (32, 384)])
def test_cuda_selection_equals_the_torch_path(dtype, K, k_aux):
    """Natively compiled selection against ``selection.topk_exact`` on bf16 rows, where boundary ties are the rule."""
    from lit_sae.sae import selection
    from lit_sae.sae.triton_kernels import topk

    g = torch.Generator(device="cuda").manual_seed(K + k_aux)
    pre = torch.randn(1000, 16384, generator=g, device="cuda").to(dtype)
    dead = torch.rand(16384, generator=g, device="cuda") < 0.5
    v, i, av, ai = topk.select(pre, K, topk.dead_bitmap(dead) if k_aux else None, k_aux)
    rv, ri = selection.topk_exact(pre, K)
    assert torch.equal(i, ri) and torch.equal(v, rv)
    if k_aux:
        dead_idx = dead.nonzero().squeeze(1)
        rav, rai = selection.topk_exact(pre[:, dead_idx].contiguous(), k_aux)
        assert torch.equal(ai, dead_idx[rai]) and torch.equal(av, rav)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("multi_topk,auxk", [(False, False), (True, True)])
def test_cuda_bf16_step_on_triton_kernels_matches_the_torch_path(monkeypatch, multi_topk, auxk):
    """One bf16-autocast TopKSAE forward and backward on CUDA, Triton kernels against PyTorch's: the same selection,
    and gradients equal up to fp32 summation order (both accumulate the same bf16 products in fp32)."""
    import math

    from lit_sae.sae.model import TopKSAE
    from lit_sae.sae.triton_kernels import dispatch

    torch.manual_seed(0)
    B, d, n, k = 4096, 768, 16384, 32
    sae = TopKSAE(d, n, k, k_aux=d // 2, multi_topk=multi_topk).cuda()
    x = torch.randn(B, d, device="cuda") + 0.3
    dead = (torch.arange(n, device="cuda") % 2 == 0) if auxk else None
    res = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv(dispatch.ENV, mode)
        sae.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae(x, dead)
        out.loss.backward()
        res[mode] = (out, {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None})
    (o_t, g_t), (o_x, g_x) = res["torch"], res["triton"]
    assert torch.equal(o_t.latent_indices, o_x.latent_indices)
    eps = torch.finfo(torch.float32).eps
    for name in g_t:
        a, r = g_x[name].double(), g_t[name].double()
        tol = 8 * eps * math.sqrt(B * (4 * k + d // 2)) * r.abs().max().item()
        assert (a - r).abs().max().item() <= tol, name
