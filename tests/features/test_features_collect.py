"""The streamed feature collector equals a brute-force dense computation, for any batching."""

import numpy as np
import pytest
import torch

from lit_sae.eval.codes import CodeBatch
from lit_sae.features.collect import FeatureCollector, _hash

L, C, T, K = 12, 30, 16, 3


def _codes(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (C, T), generator=g)
    scores = torch.rand(C, T, L, generator=g, dtype=torch.float64) ** 3  # skewed, no ties
    scores[:, :, 7] *= 0.0  # latent 7 never fires
    top = scores.topk(K, dim=-1)
    values = top.values.float()
    values[values < 0.05] = 0.0  # some zeros among the k (ReLU)
    valid = torch.ones(C, T, dtype=torch.bool)
    valid[:, 0] = False
    valid[3, 5] = False
    return tokens, values, top.indices, valid


def _batches(codes, size):
    tokens, values, indices, valid = codes
    for s in range(0, C, size):
        sl = slice(s, s + size)
        yield CodeBatch(torch.arange(C)[sl], tokens[sl], values[sl], indices[sl], valid[sl])


def _collect(codes, size, **kw):
    c = FeatureCollector(L, n_top=4, n_bands=3, per_band=2, n_bins=6, window=(3, 2), **kw)
    for p in (c.pass1, c.pass2, c.pass3):
        for b in _batches(codes, size):
            p(b)
    return c.result()


def _dense(codes):
    """(C, T, L) float64 activations, zero on tokens the SAE did not encode."""
    tokens, values, indices, valid = codes
    d = torch.zeros(C, T, L, dtype=torch.float64)
    d.scatter_(2, indices, values.double())
    return d * valid[..., None]


@pytest.mark.parametrize("size", [1, 7, C])
def test_collector_matches_dense_reference(size):
    codes = _codes()
    s = _collect(codes, size)
    d = _dense(codes)
    n_valid = int(codes[3].sum())
    assert s.n_tokens == n_valid
    for lat in range(L):
        a = d[:, :, lat]
        nz = a[a > 0]
        assert int(s.count[lat]) == nz.numel()
        assert float(s.density[lat]) == pytest.approx(nz.numel() / n_valid)
        if nz.numel() == 0:
            assert float(s.max[lat]) == 0 and s.hist[lat].sum() == 0 and (s.top_ctx[lat] == -1).all()
            continue
        mx = float(nz.max())
        assert float(s.max[lat]) == pytest.approx(mx)
        assert float(s.mean[lat]) == pytest.approx(float(nz.mean()))
        # histogram: numpy's, over the same 6 equal bins of [0, max]
        ref_hist, _ = np.histogram(nz.numpy(), bins=6, range=(0.0, mx))
        assert s.hist[lat].tolist() == ref_hist.tolist()
        # top contexts: per context its largest activation, the 4 largest contexts
        best = a.max(dim=1)
        order = sorted((c for c in range(C) if best.values[c] > 0), key=lambda c: -float(best.values[c]))[:4]
        got = [int(c) for c in s.top_ctx[lat] if c >= 0]
        assert got == order
        for j, c in enumerate(order):
            p = int(best.indices[c])
            assert int(s.top_pos[lat, j]) == p
            assert float(s.top_value[lat, j]) == pytest.approx(float(a[c, p]))
            # window: 3 tokens before, 2 after, zeros past the context's ends
            ref = [float(a[c, t]) if 0 <= t < T else 0.0 for t in range(p - 3, p + 3)]
            assert s.top_window[lat, j].tolist() == pytest.approx(ref)
        # bands: 3 equal intervals of (0, max]; in each, the 2 contexts of lowest hash of their best-hash token
        band = np.minimum((nz.numpy() / mx * 3).astype(int), 2)
        assert s.band_count[lat].tolist() == np.bincount(band, minlength=3).tolist()
        for bnd in range(3):
            cands = {}
            for c in range(C):
                for t in range(T):
                    v = float(a[c, t])
                    if v > 0 and min(int(v / mx * 3), 2) == bnd:
                        h = int(_hash(torch.tensor([lat]), torch.tensor([c]), torch.tensor([t]), 0))
                        cands[c] = min(cands.get(c, (h, t)), (h, t))
            ref = sorted((h, c, t) for c, (h, t) in cands.items())[:2]
            got = [(int(s.band_ctx[lat, bnd, j]), int(s.band_pos[lat, bnd, j])) for j in range(2)
                   if s.band_ctx[lat, bnd, j] >= 0]
            assert got == [(c, t) for _, c, t in ref]
            for j, (_, c, t) in enumerate(ref):
                assert float(s.band_value[lat, bnd, j]) == pytest.approx(float(a[c, t]))


def test_batching_does_not_change_anything():
    codes = _codes(1)
    a, b = _collect(codes, 1), _collect(codes, 11)
    # Bit-equality is exact here, not a property of this machine: "sum" adds float32 values >= 0.05 (ulp >= 2^-28)
    # into float64, and a few hundred of them (< 2^10) need under 40 of float64's 53 bits, so every partial sum is
    # exact in any order; the other fields are counts, maxima and selections.
    for field in ("count", "sum", "max", "hist", "top_value", "top_ctx", "top_pos", "band_ctx", "band_pos",
                  "band_count", "top_window", "band_window"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
