"""One summation order whatever the layout: the reductions of a training step give the same bits in one process, on
latent shards (a chained decode) and at any thread count, so that a fit on 1, 2 or 4 processes trains the same SAE.

Bit-equality is asserted only where the same kernels run on the same numbers in the same order: the chained decode
adds each token's rows one after another in ascending latent order (``embedding_bag``'s per-bag sum), a pair of
value 0 adds nothing, and a shard's chain starts from the previous shard's partial sums.
"""

import pytest
import torch

from lit_sae.sae import kernels, scatter
from lit_sae.sae.losses import normalized_mse

EPS32 = torch.finfo(torch.float32).eps


def _code(B, n, m, g):
    """(values (B, m) >= 0, indices (B, m)): distinct latents per row, in descending value order (as TopK gives)."""
    idx = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(B)])
    vals = torch.rand(B, m, generator=g).sort(dim=1, descending=True).values * 3
    return vals, idx


def _chained(codes, W, T):
    """The latent-sharded decode of ``codes`` emulated in one process: shard t holds rows [t n/T, (t+1) n/T) of W,
    continues shard t-1's sums (inits) with its own pairs; other shards' pairs are spilled (index n/T, value 0)."""
    n = W.shape[0]
    nl = n // T
    prev, grads = None, []
    for t in range(T):
        Wt = W[t * nl:(t + 1) * nl].detach().clone().requires_grad_()
        local, values = [], []
        for v, i in codes:
            v = v.detach().clone().requires_grad_()
            owned = (i >= t * nl) & (i < (t + 1) * nl)
            local.append((v * owned, torch.where(owned, i - t * nl, nl)))
            values.append(v)
        parts = kernels.sparse_decode_sets(local, Wt, inits=prev, spill=True)
        prev = [p.detach() for p in parts]
        grads.append((parts, Wt, values))
    return prev, grads


@pytest.mark.parametrize("T", [2, 4])
def test_chained_decode_and_its_gradients_have_the_bits_of_one_decode(T):
    g = torch.Generator().manual_seed(T)
    B, n, d = 96, 256, 40
    W = torch.randn(n, d, generator=g)
    W = (W / W.norm(dim=1, keepdim=True)).requires_grad_()
    codes = [_code(B, n, 8, g), _code(B, n, 24, g)]  # the k-code and an AuxK code, decoded with one backward
    G = [torch.randn(B, d, generator=g) for _ in codes]

    vals = [v.clone().requires_grad_() for v, _ in codes]
    one = kernels.sparse_decode_sets([(v, i) for v, (_, i) in zip(vals, codes)], W)
    torch.autograd.backward(one, G)

    totals, shards = _chained(codes, W, T)
    for a, b in zip(totals, one):
        assert torch.equal(a, b.detach()), "the chained decode's sums differ from one process's"
    # each shard back-propagates the whole output gradient through its own pairs (take_chained's backward)
    dW, dv = [], [torch.zeros_like(v) for v, _ in codes]
    for parts, Wt, values in shards:
        torch.autograd.backward(parts, G)
        dW.append(Wt.grad)
        for s, v in enumerate(values):
            dv[s] += v.grad  # zero where the pair is another shard's: exactly one shard writes each entry
    assert torch.equal(torch.cat(dW), W.grad), "W_dec's gradient rows differ"
    for s, v in enumerate(vals):
        assert torch.equal(dv[s], v.grad), "the values' gradient differs"


def test_decode_adds_rows_in_ascending_latent_order():
    # Three rows whose sum depends on the order in float32: 1 + 1e-8 - 1 is 0 left to right, 1e-8 otherwise.
    W = torch.tensor([[1.0], [1e-8], [-1.0]])
    vals = torch.ones(1, 3)
    for perm in ([0, 1, 2], [2, 0, 1], [0, 2, 1], [1, 2, 0]):  # [2, 0, 1] or [0, 2, 1] as given: 1e-8
        idx = torch.tensor([perm])
        out = kernels.sparse_decode(vals, idx, W)
        assert float(out) == float((torch.tensor(1.0) + torch.tensor(1e-8)) + torch.tensor(-1.0))


def test_latent_order_keeps_positions_ascending_within_a_latent():
    kernels.release_workspace()
    flat = torch.tensor([2, 0, 2, 1, 0, 2, 0, 1] * 50)
    order, starts = scatter._latent_order(flat, 3)
    kernels.release_workspace()
    for latent in range(3):
        seg = order[flat[order] == latent]
        assert torch.equal(seg, seg.sort().values), f"latent {latent}: positions out of order"
    assert starts.tolist() == [0, 150, 250]


def test_normalized_mse_has_the_same_bits_at_any_thread_count():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g) * 3 + 1
    x_hat = (x + 0.3 * torch.randn(4096, 64, generator=g)).requires_grad_()
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            x_hat.grad = None
            loss = normalized_mse(x_hat, x)
            loss.backward()
            out[threads] = (loss.detach(), x_hat.grad.clone())
    finally:
        torch.set_num_threads(before)
    for threads in (2, 4):
        assert torch.equal(out[threads][0], out[1][0]) and torch.equal(out[threads][1], out[1][1]), threads


@pytest.mark.parametrize("T", [2, 4])
def test_center_grad_continued_over_shards_has_the_bits_of_one_sum(T):
    # b_pre's encoder-side gradient sums db[i] * W_enc[i] over the latents in ascending order; a shard continues the
    # previous shard's sum (what lit_sae.parallel.tensor chains): the same additions in the same order.
    g = torch.Generator().manual_seed(T)
    n, d = 512, 48
    db, W = torch.randn(n, generator=g), torch.randn(n, d, generator=g)
    one = kernels.center_grad(db, W)
    nl, part = n // T, None
    for t in range(T):
        part = kernels.center_grad(db[t * nl:(t + 1) * nl], W[t * nl:(t + 1) * nl], part)
    assert torch.equal(part, one)
    # and it is the sum: within n * eps32 of the exact value, relative to the sum of magnitudes (a serial sum's bound)
    exact = (db.double()[:, None] * W.double()).sum(0)
    assert bool(((one.double() - exact).abs() <= n * EPS32 * (db.double().abs() @ W.double().abs())).all())
