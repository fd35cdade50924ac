"""lit-sae's Triton kernels under the Triton interpreter (CPU), against float64 references: the exact selection (values,
indices, ties, AuxK among dead columns), the sparse products, and every gradient of the encoder and decoder when the
fast path dispatches to them (``LIT_SAE_KERNELS=triton``). The interpreter is exact for float32 / float64 but not
bfloat16 (triton-lang/triton#11584), and runs one program at a time: inputs here are small, blocks large.

These cases need ``TRITON_INTERPRET=1`` set before ``triton`` is first imported (``triton.jit`` reads it when a kernel,
Triton's own ``tl.max`` included, is defined; importing lightning imports triton). ``test_triton_kernels.py`` runs
this file in a subprocess with it set, so no other test sees the variable; run it alone with
``TRITON_INTERPRET=1 python -m pytest tests/sae/triton_cases.py``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from process start (tests/sae/test_triton_kernels.py sets it)",
                allow_module_level=True)
pytest.importorskip("triton")

from lit_sae.sae import kernels, scatter
from lit_sae.sae.model import TopKSAE
from lit_sae.sae.selection import stable_topk_reference
from lit_sae.sae.triton_kernels import dispatch

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


@pytest.fixture(scope="module")
def tk():
    """(topk, sparse), built for the interpreter."""
    from lit_sae.sae.triton_kernels import sparse, topk

    assert dispatch.interpreted(), "the kernels were built natively: TRITON_INTERPRET=1 came too late"
    return topk, sparse


@pytest.fixture
def triton_mode(tk, monkeypatch):
    """The fast path's kernels forced to Triton (interpreted) for one test."""
    monkeypatch.setenv(dispatch.ENV, "triton")
    return tk


def _close(a, b, eps, length, name):
    """|a - b| <= 8 eps sqrt(length) x scale: summation-order error of ``length``-term sums in a dtype of ``eps``."""
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    err = (a.double() - b.double()).abs().max().item()
    tol = 8 * eps * math.sqrt(length) * scale
    assert err <= tol, f"{name}: max abs err {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("kind", ["integer", "gaussian", "equal_columns", "signed_zeros"])
@pytest.mark.parametrize("K,k_aux", [(1, 0), (13, 0), (32, 24)])
def test_select_equals_the_stable_sort_with_ties(tk, kind, K, k_aux):
    topk, _ = tk
    g = torch.Generator().manual_seed(hash((kind, K)) % 2**31)
    R, m = 67, 700  # rows not a multiple of the rows per program, columns not a multiple of the tile
    if kind == "gaussian":
        pre = torch.randn(R, m, generator=g)
    else:
        pre = torch.randint(-3, 4, (R, m), generator=g).float()
        if kind == "equal_columns":
            pre[:, 350:] = pre[:, :350]
        if kind == "signed_zeros":  # -0.0 == +0.0: ties, broken by the column like any other
            pre = torch.where(pre > 0, pre.neg(), pre) * 0.0 + torch.where(pre == 3, float("-inf"), 0.0)
    dead = torch.rand(m, generator=g) < 0.4
    v, i, av, ai = topk.select(pre, K, topk.dead_bitmap(dead) if k_aux else None, k_aux)
    rv, ri = stable_topk_reference(pre.double(), K)
    assert torch.equal(i, ri), "indices differ from the stable descending sort"
    assert torch.equal(v.double(), rv)
    if k_aux:
        dead_idx = dead.nonzero().squeeze(1)
        rav, rai = stable_topk_reference(pre[:, dead_idx].double(), k_aux)
        assert torch.equal(ai, dead_idx[rai]) and torch.equal(av.double(), rav)
    else:
        assert av.shape == (R, 0) and ai.shape == (R, 0)


def test_select_on_a_chunk_view_and_its_refusals(tk):
    topk, _ = tk
    base = torch.randint(-2, 3, (40, 600)).float()
    chunk = base[7:31]  # a row slice of a larger buffer, as the encoder's chunks are
    v, i, _, _ = topk.select(chunk, 9)
    rv, ri = stable_topk_reference(chunk.double(), 9)
    assert torch.equal(i, ri) and torch.equal(v.double(), rv)
    with pytest.raises(ValueError, match="float64"):
        topk.select(chunk.double(), 9)
    with pytest.raises(ValueError, match="K=601"):
        topk.select(chunk, 601)
    with pytest.raises(ValueError, match="contiguous"):
        topk.select(base.t(), 3)


def test_dead_bitmap_sets_exactly_the_dead_bits(tk):
    topk, _ = tk
    dead = torch.rand(70) < 0.5
    dead[31] = dead[63] = True  # the sign bit of a word
    words = topk.dead_bitmap(dead).to(torch.int64) & 0xFFFFFFFF
    bits = ((words[:, None] >> torch.arange(32)) & 1).reshape(-1)
    assert torch.equal(bits[:70].bool(), dead) and not bits[70:].any()


# ------------------------------------------------------------------------------------------------ sparse products
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_kernels_match_float64_references(tk, dtype):
    _, sparse = tk
    g = torch.Generator().manual_seed(3)
    B, m, n, d = 50, 40, 200, 130  # d above one 128-column block; repeated indices within rows
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    idx = torch.randint(0, n, (B, m), generator=g)
    v = torch.randn(B, m, generator=g, dtype=torch.float64)
    G = torch.randn(B, d, generator=g, dtype=torch.float64)
    eps = EPS64 if dtype == torch.float64 else EPS32

    y = sparse.gather_sum(v.to(dtype), idx, W.to(dtype))
    _close(y, (v[:, :, None] * W[idx]).sum(1), eps, m, "gather_sum")
    dv = sparse.gather_dot(idx, W.to(dtype), G.to(dtype))
    _close(dv, (W[idx] * G[:, None]).sum(-1), eps, d, "gather_dot")

    flat = idx.reshape(-1)
    order, starts = scatter._latent_order(flat, n)
    dW = sparse.scatter_sorted(order // m, v.reshape(-1)[order].to(dtype), starts, G.to(dtype), n)
    ref = torch.zeros(n, d, dtype=torch.float64).index_add_(0, flat, v.reshape(-1)[:, None] * G.repeat_interleave(m, 0))
    _close(dW, ref, eps, B * m / n * 4, "scatter_sorted")
    assert y.dtype == dv.dtype == dW.dtype == dtype
    # empty inputs: no launch (an empty grid), the sums of nothing
    assert not sparse.gather_sum(v[:0].to(dtype), idx[:0], W.to(dtype)).numel()
    assert sparse.gather_sum(v[:, :0].to(dtype), idx[:, :0], W.to(dtype)).abs().sum() == 0
    assert sparse.gather_dot(idx[:, :0], W.to(dtype), G.to(dtype)).shape == (B, 0)
    empty = torch.zeros(0, dtype=torch.int64)
    assert sparse.scatter_sorted(empty, empty.to(dtype), torch.zeros(n, dtype=torch.int64), G.to(dtype), n).abs().sum() == 0


# ------------------------------------------------------------------------------------------------ through the fast path
def _encode_and_grads(fn, x, W, b, b_pre, k, k_multi, k_aux, dead, seed=5):
    out = fn(x, W, b, k, k_multi=k_multi, k_aux=k_aux, dead_mask=dead, b_pre=b_pre)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for val in (out.values, out.multi_values, out.aux_values):
        if val is not None:
            loss = loss + (val * torch.randint(-3, 4, val.shape, generator=g).to(val.dtype)).sum()
    return out, torch.autograd.grad(loss, (x, W, b, b_pre))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,k_multi,k_aux", [(8, 0, 0), (8, 32, 0), (8, 0, 24)])
def test_topk_encode_on_triton_kernels_matches_the_dense_reference(triton_mode, dtype, k, k_multi, k_aux):
    """Float64: the sparse kernels' gradients (selection stays torch.topk). Float32 on integer inputs: every product is
    exact, so the Triton selection must return the reference's indices, ties included, and the same values."""
    g = torch.Generator().manual_seed(k + k_multi + k_aux)
    B, d, n = 48, 24, 320
    x = torch.randint(-2, 3, (B, d), generator=g).double()
    W = torch.randint(-1, 2, (n, d), generator=g).double()
    b = torch.randint(-1, 2, (n,), generator=g).double()
    b_pre = torch.randint(-1, 2, (d,), generator=g).double()
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    ref_in = [t.clone().requires_grad_() for t in (x, W, b, b_pre)]
    tri_in = [t.to(dtype).requires_grad_() for t in (x, W, b, b_pre)]
    ref, gr = _encode_and_grads(kernels.naive_topk_encode, *ref_in, k, k_multi, k_aux, dead if k_aux else None)
    out, gt = _encode_and_grads(kernels.topk_encode, *tri_in, k, k_multi, k_aux, dead if k_aux else None)
    for name in kernels.EncodeOut._fields:
        a, r = getattr(out, name), getattr(ref, name)
        assert (a is None) == (r is None), name
        if a is not None and ("indices" in name or dtype == torch.float32):  # exact products: the same selection
            assert torch.equal(a.double(), r), name
        elif a is not None:
            _close(a, r, EPS64, d, name)
    eps = EPS64 if dtype == torch.float64 else EPS32
    for name, a, r in zip(("x", "W_enc", "b_enc", "b_pre"), gt, gr):
        _close(a, r, eps, B * (k_multi or k) + k_aux, f"grad {name}")


@pytest.mark.parametrize("multi_topk,auxk", [(False, False), (True, True)])
def test_topksae_step_on_triton_kernels_matches_the_torch_path(tk, monkeypatch, multi_topk, auxk):
    """A float32 TopKSAE forward and backward (decode sets, Multi-TopK, AuxK): Triton kernels against PyTorch's."""
    torch.manual_seed(0)
    B, d, n, k = 64, 32, 256, 8
    sae = TopKSAE(d, n, k, k_aux=16, multi_topk=multi_topk)
    x = torch.randn(B, d) + 0.3
    dead = (torch.arange(n) % 2 == 0) if auxk else None
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv(dispatch.ENV, mode)
        sae.zero_grad(set_to_none=True)
        out = sae(x, dead)
        out.loss.backward()
        results[mode] = (out, {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None})
    (o_t, g_t), (o_x, g_x) = results["torch"], results["triton"]
    assert torch.equal(o_t.latent_indices, o_x.latent_indices)
    _close(o_x.loss, o_t.loss, EPS32, d * k, "loss")
    assert g_t.keys() == g_x.keys() and {"W_enc", "W_dec", "b_enc", "b_pre"} <= g_t.keys()
    for name in g_t:
        _close(g_x[name], g_t[name], EPS32, B * (4 * k + 16), f"grad {name}")


# ------------------------------------------------------------------------------------------------ dispatch
def test_dispatch_modes_and_a_bad_setting(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.mode() == "auto" and not dispatch.use_triton(cpu)  # CPU stays on PyTorch by default
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert not dispatch.use_triton(cpu)
    monkeypatch.setenv(dispatch.ENV, "cuda-please")
    with pytest.raises(ValueError, match="LIT_SAE_KERNELS='cuda-please' is not one of auto, torch, triton"):
        dispatch.mode()
    dispatch.set_mode("torch")
    try:
        assert dispatch.mode() == "torch"  # the process setting wins over the environment
    finally:
        dispatch.set_mode(None)
    with pytest.raises(ValueError, match="not one of"):
        dispatch.set_mode("fast")


def test_chained_decode_on_triton_kernels_has_the_bits_of_one_decode(triton_mode):
    """A latent-sharded decode (``lit_sae.parallel.tensor``) continues the previous shard's sums (the kernel's INIT)
    with its own pairs, the other shards' spilled: float32 bits equal to one decode of the whole code, and W_dec's
    gradient rows (each shard's segments are one process's segments, summed by the same program) too."""
    g = torch.Generator().manual_seed(11)
    B, n, d, m, T = 40, 96, 130, 12, 2
    W = torch.randn(n, d, generator=g).requires_grad_()
    idx = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(B)])
    vals = torch.rand(B, m, generator=g).requires_grad_()
    G = torch.randn(B, d, generator=g)
    one = kernels.sparse_decode_sets([(vals, idx)], W)[0]
    one.backward(G)
    nl, prev, dW = n // T, None, []
    for t in range(T):
        Wt = W[t * nl:(t + 1) * nl].detach().clone().requires_grad_()
        owned = (idx >= t * nl) & (idx < (t + 1) * nl)
        part = kernels.sparse_decode_sets([(vals.detach() * owned, torch.where(owned, idx - t * nl, nl))], Wt,
                                          inits=prev, spill=True)[0]
        part.backward(G)
        prev, _ = [part.detach()], dW.append(Wt.grad)
    assert torch.equal(prev[0], one.detach())
    assert torch.equal(torch.cat(dW), W.grad)
