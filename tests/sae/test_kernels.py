"""The fast kernels against the dense reference (float64, outputs and every gradient), plus the properties that make
them fast: no dense (B, n_latents) tensor in the backward, bounded pre-activation chunks."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lit_sae.sae import kernels, scatter, selection

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RTOL = 1e-6


def _close(a, b, name):
    """Relative closeness (to the larger tensor's scale), with a message naming the tensor."""
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    err = (a - b).abs().max().item()
    assert err <= RTOL * scale, f"{name}: max abs err {err:.3g} > {RTOL} x {scale:.3g}"


def _inputs(B, d, n, device, *, integer=False, dup_rows=0, seed=0):
    """Random float64 inputs. integer=True draws small integers so that pre-activations tie all over the place;
    dup_rows copies encoder rows (and biases) so that whole columns of pre-activations tie."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        x = torch.randint(-2, 3, (B, d), generator=g).double()
        W = torch.randint(-1, 2, (n, d), generator=g).double()
        b = torch.randint(-1, 2, (n,), generator=g).double()
    else:
        x, W, b = torch.randn(B, d, generator=g), torch.randn(n, d, generator=g) / d**0.5, torch.randn(n, generator=g)
        x, W, b = x.double(), W.double(), b.double() * 0.1
    if dup_rows:
        src = torch.randperm(n, generator=g)[:dup_rows]
        dst = torch.randperm(n, generator=g)[:dup_rows]
        W[dst], b[dst] = W[src], b[src]
    return [t.to(device).requires_grad_() for t in (x, W, b)]


def _run_encode(fn, x, W, b, k, k_multi, k_aux, dead_mask, seed=1):
    """Outputs of ``fn`` and the gradients of a random linear function of all its value outputs."""
    out = fn(x, W, b, k, k_multi=k_multi, k_aux=k_aux, dead_mask=dead_mask)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for v in (out.values, out.multi_values, out.aux_values):
        if v is not None:
            loss = loss + (v * torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device)).sum()
    grads = torch.autograd.grad(loss, (x, W, b))
    return out, grads


def _compare_encode(x, W, b, k, k_multi=0, k_aux=0, dead_mask=None):
    fast, gf = _run_encode(kernels.topk_encode, x, W, b, k, k_multi, k_aux, dead_mask)
    ref, gr = _run_encode(kernels.naive_topk_encode, x, W, b, k, k_multi, k_aux, dead_mask)
    for name in kernels.EncodeOut._fields:
        a, r = getattr(fast, name), getattr(ref, name)
        assert (a is None) == (r is None), f"{name}: fast {a is None} vs reference {r is None}"
        if a is None:
            continue
        if "indices" in name:
            assert torch.equal(a, r), f"{name} differ"
            assert a.dtype == torch.long
        else:
            _close(a, r, name)
    for name, a, r in zip(("x_c", "W_enc", "b_enc"), gf, gr):
        _close(a, r, f"grad {name}")
    return fast


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "k,k_multi,k_aux,n_dead",
    [(8, 0, 0, 0), (8, 32, 0, 0), (8, 0, 16, 40), (8, 32, 16, 40), (8, 0, 16, 5), (1, 4, 3, 1), (64, 64, 0, 0)],
)
def test_encode_matches_reference(device, k, k_multi, k_aux, n_dead):
    x, W, b = _inputs(48, 24, 64 if k == 64 else 200, device)
    dead = None
    if n_dead:
        dead = torch.zeros(W.shape[0], dtype=torch.bool, device=device)
        dead[torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(3))[:n_dead].to(device)] = True
    out = _compare_encode(x, W, b, k, k_multi, k_aux, dead)
    if n_dead:
        assert out.aux_values.shape[1] == min(k_aux, n_dead)
        assert bool(dead[out.aux_indices].all()), "AuxK picked a live latent"
    if k_multi:
        assert torch.equal(out.multi_indices[:, :k], out.indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("k,k_multi,k_aux", [(8, 0, 0), (8, 32, 16)])
def test_encode_centres_with_b_pre_inside(device, x_grad, k, k_multi, k_aux):
    """b_pre passed in: the same outputs as centring outside, and b_pre's gradient (computed as -db_enc @ W_enc, no
    per-row gather) equal to the reference's sum of x_c's per-row gradients, in float64; x's gradient when asked."""
    x, W, b = _inputs(48, 24, 200, device, seed=7)
    x = x.detach().requires_grad_(x_grad)
    b_pre = (torch.randn(24, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 0.5).to(device)
    dead = torch.zeros(200, dtype=torch.bool, device=device)
    dead[1::4] = True
    results = []
    for fn, inside in ((kernels.topk_encode, True), (kernels.naive_topk_encode, True), (kernels.naive_topk_encode,
                                                                                       False)):
        bp = b_pre.clone().requires_grad_()
        xin, extra = (x, {"b_pre": bp}) if inside else (x - bp, {})
        out = fn(xin, W, b, k, k_multi=k_multi, k_aux=k_aux, dead_mask=dead, **extra)
        g = torch.Generator().manual_seed(9)
        loss = sum((v * torch.randn(v.shape, generator=g, dtype=v.dtype).to(device)).sum()
                   for v in (out.values, out.multi_values, out.aux_values) if v is not None)
        wrt = (W, b, bp) + ((x,) if x_grad else ())
        results.append((out, torch.autograd.grad(loss, wrt)))
    (fast, gf), *refs = results
    assert gf[2].abs().max() > 0.1, "b_pre's gradient should not vanish on these inputs"
    for ref, gr in refs:
        assert torch.equal(fast.indices, ref.indices)
        assert (fast.aux_indices is None) == (k_aux == 0) == (ref.aux_indices is None)
        assert k_aux == 0 or torch.equal(fast.aux_indices, ref.aux_indices)
        _close(fast.values, ref.values, "values")
        for name, a, r in zip(("W_enc", "b_enc", "b_pre", "x"), gf, gr):
            _close(a, r, f"grad {name}")


def test_encode_rejects_b_pre_of_the_wrong_width():
    x, W, b = _inputs(4, 6, 20, "cpu")
    for fn in (kernels.topk_encode, kernels.naive_topk_encode):
        with pytest.raises(ValueError, match=r"b_pre \(5,\) must be \(d,\) = \(6,\)"):
            fn(x, W, b, 4, b_pre=torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("integer,dup_rows", [(True, 0), (False, 30), (True, 30)])
def test_encode_ties_match_reference_and_definition(device, integer, dup_rows):
    x, W, b = _inputs(64, 12, 150, device, integer=integer, dup_rows=dup_rows, seed=5)
    dead = torch.zeros(150, dtype=torch.bool, device=device)
    dead[::3] = True
    pre = torch.nn.functional.linear(x, W, b).detach()  # the product both paths compute (same rounding)
    _, s_idx = torch.sort(pre, dim=1, descending=True, stable=True)
    s_ties = (pre.sort(dim=1).values.diff(dim=1) == 0).any(dim=1)
    assert bool(s_ties.all()), "test inputs should tie in every row"
    out = _compare_encode(x, W, b, 10, 20, 12, dead)
    assert torch.equal(out.multi_indices, s_idx[:, :20]), "order differs from a stable descending sort"
    _, s_aux = torch.sort(pre.masked_fill(~dead, float("-inf")), dim=1, descending=True, stable=True)
    assert torch.equal(out.aux_indices, s_aux[:, :12])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 32, 200])
def test_topk_exact_bf16_rows_with_many_boundary_ties(device, K):
    # bf16 keeps 8 significant bits: over 4096 columns most rows tie across the selection boundary, as the encoder's
    # chunks do on a GPU under autocast. The selection must equal a stable descending sort (ties: lower index first).
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(300, 4096, generator=g).to(torch.bfloat16).to(device)
    pre[:5] = 0.5  # whole rows of one value: the repair picks the K lowest columns
    vals, idx = selection.topk_exact(pre, K)
    ref_vals, ref_idx = selection.stable_topk_reference(pre, K)
    top = pre.topk(K + 1, dim=1).values
    tie_rate = (top[:, K] == top[:, K - 1]).float().mean()
    assert bool(tie_rate > (0.3 if K > 1 else 0.0)), f"rows tying at the boundary: {float(tie_rate):.2f}"
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    assert torch.equal(idx[:5], torch.arange(K, device=device).expand(5, -1))


@pytest.mark.parametrize("group", [4, 16])
@pytest.mark.parametrize("K", [1, 7, 40])
@pytest.mark.parametrize("m", [1024, 1000])  # 1000: columns beyond the last whole group are always candidates
def test_topk_prefiltered_equals_the_stable_sort_with_ties(K, group, m):
    # Small integers tie everywhere: between group maxima (the fallback path), at the selection boundary (the repair),
    # and inside the selection. Rows of one value and rows where the winner sits in the tail cover the edge cases.
    g = torch.Generator().manual_seed(11)
    pre = torch.randint(-20, 20, (64, m), generator=g).double()
    pre[:3] = 2.0
    pre[3:6, -1] = 50.0
    pre[6:40] = torch.randn(34, m, generator=g).double()  # distinct values: the pre-filter's own path
    vals, idx = selection.topk_prefiltered(pre, K, group)
    ref_vals, ref_idx = selection.stable_topk_reference(pre, K)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    assert torch.equal(idx[:3], torch.arange(K).expand(3, -1))
    assert bool((idx[3:6, 0] == m - 1).all())


def test_topk_exact_uses_the_prefilter_on_wide_cpu_rows_only():
    wide = torch.randn(200, 4096, generator=torch.Generator().manual_seed(4))
    assert selection.prefilter_group_size(4096, 8, wide) == 16
    assert selection.prefilter_group_size(4096, 32, wide) == 8  # 512 groups of 8 >= 12 x 33
    assert selection.prefilter_group_size(4096, 384, wide) == 0  # too few groups: plain top-k
    assert selection.prefilter_group_size(4096, 8, wide.bfloat16()) == 0  # bf16: group maxima tie too often
    assert selection.prefilter_group_size(4096, 0, wide) == 0
    for K in (8, 32):
        vals, idx = selection.topk_exact(wide, K)
        ref_vals, ref_idx = selection.stable_topk_reference(wide, K)
        assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)


@pytest.mark.parametrize("integer", [False, True])
def test_encode_on_wide_rows_through_the_prefilter_matches_reference(integer):
    x, W, b = _inputs(40, 16, 2048, "cpu", integer=integer, seed=9)
    assert selection.prefilter_group_size(2048, 12, x.detach()) > 0
    dead = torch.zeros(2048, dtype=torch.bool)
    dead[::2] = True  # the AuxK selection among 1024 dead columns goes through it as well
    _compare_encode(x, W, b, 4, 12, 6, dead)


def test_encode_chunked_rows_match(monkeypatch):
    x, W, b = _inputs(37, 16, 100, "cpu", integer=True, seed=7)
    dead = torch.rand(100, generator=torch.Generator().manual_seed(2)) < 0.3
    # 5 rows of 100 float64 per chunk: 8 chunks, the last one partial.
    monkeypatch.setattr(kernels, "MAX_PREACT_BYTES", 5 * 100 * 8)
    _compare_encode(x, W, b, 6, 24, 9, dead)


def test_encode_without_dead_or_k_aux_gives_no_aux():
    x, W, b = _inputs(8, 8, 32, "cpu")
    none_dead = torch.zeros(32, dtype=torch.bool)
    for k_aux, dead in [(0, torch.ones(32, dtype=torch.bool)), (4, None), (4, none_dead)]:
        out = kernels.topk_encode(x, W, b, 4, k_aux=k_aux, dead_mask=dead)
        assert out.aux_values is None and out.aux_indices is None and out.multi_values is None


def test_encode_rejects_bad_k():
    x, W, b = _inputs(4, 8, 16, "cpu")
    with pytest.raises(ValueError, match="k=17"):
        kernels.topk_encode(x, W, b, 17)
    with pytest.raises(ValueError, match="k_multi=2"):
        kernels.topk_encode(x, W, b, 4, k_multi=2)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_matches_reference_with_repeated_indices(device):
    g = torch.Generator().manual_seed(0)
    B, k, n, d = 40, 12, 30, 20
    values = torch.randn(B, k, generator=g, dtype=torch.float64).to(device).requires_grad_()
    indices = torch.randint(0, n, (B, k), generator=g).to(device)
    indices[:, 1] = indices[:, 0]  # every row repeats an index
    W = torch.randn(n, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    gout = torch.randn(B, d, generator=g, dtype=torch.float64).to(device)
    res = []
    for fn in (kernels.sparse_decode, kernels.naive_sparse_decode):
        out = fn(values, indices, W)
        res.append((out, *torch.autograd.grad(out, (values, W), gout)))
    for name, a, r in zip(("x_hat", "grad values", "grad W_dec"), *res):
        _close(a, r, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("widths,used", [((12, 36, 7), (True, True, True)), ((5, 0, 9), (True, True, False))])
def test_decode_sets_match_separate_reference_decodes(device, widths, used):
    """One backward for several codes (k, Multi-TopK's extra, AuxK) equals the dense reference of each, float64;
    an output left out of the loss (None gradient) and an empty set are handled."""
    g = torch.Generator().manual_seed(1)
    B, n, d = 30, 40, 16
    W = torch.randn(n, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    codes = []
    for m in widths:
        v = torch.randn(B, m, generator=g, dtype=torch.float64).to(device).requires_grad_()
        i = torch.randint(0, n, (B, m), generator=g).to(device)
        codes.append((v, i))
    gouts = [torch.randn(B, d, generator=g, dtype=torch.float64).to(device) for _ in widths]
    inputs = [W] + [v for v, _ in codes]
    res = []
    for fast in (True, False):
        outs = (
            kernels.sparse_decode_sets(codes, W) if fast else [kernels.naive_sparse_decode(v, i, W) for v, i in codes]
        )
        loss = sum((o * go).sum() for o, go, u in zip(outs, gouts, used) if u)
        res.append((*outs, *torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)))
    names = [f"x_hat {s}" for s in range(len(widths))] + ["grad W_dec"]
    names += [f"grad values {s}" for s in range(len(widths))]
    for name, a, r in zip(names, *res):
        if a.numel() == 0:  # the empty set: nothing to compare but the shape
            assert a.shape == r.shape, name
        else:
            _close(a, r, name)


class _OpLog(TorchDispatchMode):
    """Records the shape of every tensor an op produces (to prove no dense (B, n) tensor is built) and counts the
    calls of each aten overload packet."""

    def __init__(self):
        super().__init__()
        self.shapes = []
        self.calls = collections.Counter()
        self.flat_sorts = 0  # sorts of a 1-D tensor (the latent grouping of all pairs), not of each row's few pairs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket] += 1
        if func.overloadpacket is torch.ops.aten.sort and args[0].dim() == 1:
            self.flat_sorts += 1
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_dense_latent_tensor_in_backward_and_chunked_forward(monkeypatch):
    B, d, n = 64, 16, 512
    x, W, b = _inputs(B, d, n, "cpu")
    Wd = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[:100] = True
    monkeypatch.setattr(kernels, "MAX_PREACT_BYTES", 16 * n * 8)  # 16-row chunks
    fwd, bwd = _OpLog(), _OpLog()
    with fwd:
        out = kernels.topk_encode(x, W, b, 8, k_multi=32, k_aux=16, dead_mask=dead)
        loss = kernels.sparse_decode(out.values, out.indices, Wd).square().sum()
        loss = loss + kernels.sparse_decode(out.multi_values, out.multi_indices, Wd).square().sum()
        loss = loss + kernels.sparse_decode(out.aux_values, out.aux_indices, Wd).square().sum()
    with bwd:
        loss.backward()
    assert (16, n) in fwd.shapes  # the chunks did run
    assert max(s[0] * s[1] for s in fwd.shapes if len(s) == 2 and s[1] == n) <= 16 * n
    assert not [s for s in bwd.shapes if len(s) == 2 and s == (B, n)], "dense (B, n) tensor in the backward"
    assert W.grad is not None and Wd.grad is not None and x.grad is not None and b.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_runs_and_stays_close(device):
    g = torch.Generator().manual_seed(0)
    B, d, n, k = 64, 32, 256, 8
    x = torch.randn(B, d, generator=g).to(device).requires_grad_()
    W = (torch.randn(n, d, generator=g) / d**0.5).to(device).requires_grad_()
    b = torch.zeros(n, device=device, requires_grad=True)
    Wd = (torch.randn(n, d, generator=g) / d**0.5).to(device).requires_grad_()
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    dead[:50] = True

    def step(autocast):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            out = kernels.topk_encode(x, W, b, k, k_multi=4 * k, k_aux=16, dead_mask=dead)
            x_hat = kernels.sparse_decode(out.values, out.indices, Wd)
            aux = kernels.sparse_decode(out.aux_values, out.aux_indices, Wd)
            loss = (x_hat.float() - x).square().mean() + aux.float().square().mean()
        grads = torch.autograd.grad(loss, (x, W, b, Wd))
        return out, loss, grads

    out16, loss16, g16 = step(True)
    out32, loss32, g32 = step(False)
    assert out16.values.dtype == torch.bfloat16 and out32.values.dtype == torch.float32
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    for a, r in zip(g16, g32):
        assert a.dtype == r.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a - r).norm() < 0.1 * r.norm()


def _sae_loss_curve(fast: bool, steps: int = 50):
    sae_mod = pytest.importorskip("lit_sae.sae.model")
    torch.manual_seed(0)
    sae = sae_mod.TopKSAE(16, 96, 4, k_aux=8, multi_topk=True, fast=fast).double()
    g = torch.Generator().manual_seed(1)
    data = torch.randn(steps, 64, 16, generator=g, dtype=torch.float64) + 0.5
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::4] = True  # a fixed set of "dead" latents so that AuxK contributes every step
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    curve = []
    for x in data:
        out = sae(x, dead_mask=dead)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grads_()
        opt.step()
        sae.normalize_decoder_()
        curve.append(out.loss.item())
    return torch.tensor(curve, dtype=torch.float64)


def test_topksae_fast_and_naive_train_identically():
    fast, naive = _sae_loss_curve(True), _sae_loss_curve(False)
    assert fast[-1] < fast[0], "loss did not go down"
    assert torch.allclose(fast, naive, rtol=1e-9, atol=0), f"max diff {(fast - naive).abs().max():.3g}"


def test_reused_chunk_buffer_serves_inference_mode_then_training():
    # Lightning validates under inference mode: a chunk buffer first allocated there must still be writable by the
    # next training step, and the results must not alias it (a later call overwrites the buffer).
    kernels.release_workspace()
    x, W, b = _inputs(16, 8, 64, "cpu", seed=4)
    with torch.inference_mode():
        first = kernels.topk_encode(x, W, b, 4)
    assert kernels.workspace_bytes() == 16 * 64 * 8
    kept = first.values.clone()
    _compare_encode(x, W, b, 4)
    kernels.topk_encode(x * 3, W, b, 4)
    assert torch.equal(first.values, kept)
    kernels.release_workspace()
    assert kernels.workspace_bytes() == 0


@pytest.mark.parametrize("multi_topk,auxk", [(False, False), (False, True), (True, True)])
def test_sae_backward_sorts_its_pairs_once(multi_topk, auxk):
    # The decoder's W_dec scatter and the encoder's W_enc scatter group the same (token, latent) pairs by latent:
    # one sort serves both, and the gradients still equal the dense reference's (float64).
    sae_mod = pytest.importorskip("lit_sae.sae.model")
    grads = {}
    for fast in (True, False):
        torch.manual_seed(0)
        sae = sae_mod.TopKSAE(16, 96, 4, k_aux=8, multi_topk=multi_topk, fast=fast).double()
        x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
        dead = torch.zeros(96, dtype=torch.bool)
        dead[::3] = True
        out = sae(x, dead_mask=dead if auxk else None)
        log = _OpLog()
        with log:
            out.loss.backward()
        if fast:
            assert log.flat_sorts == 1, log.flat_sorts
        grads[fast] = {name: p.grad for name, p in sae.named_parameters()}
    for name, g in grads[True].items():
        _close(g, grads[False][name], f"grad {name}")


def test_latent_order_memo_is_used_once_and_only_for_equal_pairs():
    kernels.release_workspace()
    a = torch.tensor([3, 1, 3, 0, 2, 1])
    order, offsets = scatter._latent_order(a, 5)
    assert a[order].tolist() == [0, 1, 1, 2, 3, 3] and offsets.tolist() == [0, 1, 3, 4, 6]
    b = torch.tensor([4, 4, 0, 2, 2, 1])  # same shape, other pairs: sorted afresh, not the memo's answer
    order_b, offsets_b = scatter._latent_order(b, 5)
    assert b[order_b].tolist() == [0, 1, 2, 2, 4, 4] and offsets_b.tolist() == [0, 1, 2, 4, 4]
    again = scatter._latent_order(b.clone(), 5)  # equal content: the memo's tensors, then the memo is gone
    assert again[0] is order_b and again[1] is offsets_b
    assert scatter._latent_order(b.clone(), 5)[0] is not order_b
    b2 = b.clone()
    scatter._latent_order(b2, 5)
    b2[0] = 0  # changed in place after it was sorted: the memo no longer describes it
    assert b2[scatter._latent_order(b2, 5)[0]].tolist() == [0, 0, 1, 2, 2, 4]
    kernels.release_workspace()
