"""lit-sae's Triton kernels compile for an H100 / H200 (sm_90) with Triton's real compiler, on this GPU-less machine:
the interpreter (``test_triton_kernels.py``) checks what they compute, this that CUDA can build them as launched."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed (pip install 'lit-sae[test]' on Linux x86-64)"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter skips the compiler"),
    pytest.mark.slow,  # ~15 s without a warm Triton cache
]


def test_every_cuda_launch_compiles_to_a_cubin_without_spills(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a cold cache: really compiles, writes nothing elsewhere
    from lit_sae.sae.triton_kernels import compile_check

    rows = compile_check.compile_all(90)
    assert len(rows) == 10, [r["label"] for r in rows]  # 6 selections, 3 sparse products, the continued decode
    failed = [f"{r['label']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert all(r["reg"] > 0 for r in rows), rows  # the resource report was read from the cubin
    spills = [r["label"] for r in rows if r["local"] > 0]
    assert not spills, f"kernels spill registers to local memory: {spills}"
