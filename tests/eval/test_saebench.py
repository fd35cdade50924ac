"""SAEBench core metrics against float64 hand computations of SAEBench's formulas (sae_bench/evals/core/main.py)."""

import math

import pytest
import torch

from lit_sae.eval.saebench import CoreMetrics, downstream_groups, max_cosine_sims, misc_metrics, saebench_core_section


def _batches(seed=0, n_lat=20, d=6, k=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for B in (7, 5, 9):
        x = torch.randn(B, d, generator=g, dtype=torch.float64) * 2 + 1
        x_hat = x + 0.3 * torch.randn(B, d, generator=g, dtype=torch.float64)
        idx = torch.stack([torch.randperm(n_lat, generator=g)[:k] for _ in range(B)])
        val = torch.rand(B, k, generator=g, dtype=torch.float64)
        val[0, 0] = 0.0  # a zero-padded slot is not active
        out.append((x, x_hat, val, idx))
    return out


def test_core_metrics_match_a_hand_computation():
    n_lat, d = 20, 6
    batches = _batches(n_lat=n_lat, d=d)
    m = CoreMetrics(n_lat, d)
    for b in batches:
        m.update(*b)
    got = m.compute()
    X = torch.cat([b[0] for b in batches])
    Xh = torch.cat([b[1] for b in batches])
    N = X.shape[0]
    # explained variance: 1 - E||x - x_hat||^2 / E||x - E x||^2 over all tokens
    ev = 1 - ((X - Xh) ** 2).sum(1).mean() / ((X - X.mean(0)) ** 2).sum(1).mean()
    # mse: each token's squared error divided by its batch's token count, averaged over tokens
    mse = sum(float(((x - xh) ** 2).sum(1).sum() / len(x)) for x, xh, *_ in batches) / N
    cos = torch.nn.functional.cosine_similarity(X, Xh, dim=1).mean()
    rrb = sum(float((xh.norm(dim=1) ** 2).mean() / (x * xh).sum(1).mean()) for x, xh, *_ in batches) / 3
    rq, sh, sp = got["reconstruction_quality"], got["shrinkage"], got["sparsity"]
    assert rq["explained_variance"] == pytest.approx(float(ev), rel=1e-12)
    assert rq["mse"] == pytest.approx(mse, rel=1e-12)
    assert rq["cossim"] == pytest.approx(float(cos), rel=1e-12)
    assert sh["l2_norm_in"] == pytest.approx(float(X.norm(dim=1).mean()), rel=1e-12)
    assert sh["l2_norm_out"] == pytest.approx(float(Xh.norm(dim=1).mean()), rel=1e-12)
    assert sh["l2_ratio"] == pytest.approx(float((Xh.norm(dim=1) / X.norm(dim=1)).mean()), rel=1e-12)
    assert sh["relative_reconstruction_bias"] == pytest.approx(rrb, rel=1e-12)
    # dense codes for l0, l1 and the densities
    Z = torch.zeros(N, n_lat, dtype=torch.float64)
    row = 0
    for _, _, v, i in batches:
        Z[row : row + len(v)].scatter_(1, i, v)
        row += len(v)
    assert sp["l0"] == pytest.approx(float((Z != 0).sum(1).double().mean()), rel=1e-12)
    assert sp["l1"] == pytest.approx(float(Z.sum(1).mean()), rel=1e-12)
    torch.testing.assert_close(got["feature_density"].double(), (Z > 0).double().mean(0), rtol=1e-6, atol=1e-7)
    assert got["token_stats"] == {"total_tokens_eval_sparsity_variance": N, "batch_tokens": 9}


def test_l2_ratio_divides_tiny_inputs_by_one():
    m = CoreMetrics(4, 2)
    x = torch.tensor([[1e-6, 0.0], [3.0, 4.0]], dtype=torch.float64)
    x_hat = torch.tensor([[0.5, 0.0], [3.0, 0.0]], dtype=torch.float64)
    m.update(x, x_hat, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long))
    assert m.compute()["shrinkage"]["l2_ratio"] == pytest.approx((0.5 / 1 + 3.0 / 5.0) / 2, rel=1e-12)


def test_max_cosine_sims_and_misc_metrics_by_hand():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(30, 8, generator=g, dtype=torch.float64)
    U = W / W.norm(dim=1, keepdim=True)
    S = U @ U.T
    S.fill_diagonal_(-math.inf)
    torch.testing.assert_close(max_cosine_sims(W, chunk=7), S.max(1).values)
    density = torch.tensor([0.0, 0.005, 0.02, 0.2, 0.5, 0.0])
    W_enc, W_dec = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    m = misc_metrics(density, W_enc, W_dec)
    total = 0.725
    assert m["frac_alive"] == pytest.approx(4 / 6)
    assert m["freq_over_1_percent"] == pytest.approx(3 / 6) and m["freq_over_10_percent"] == pytest.approx(2 / 6)
    assert m["normalized_freq_over_1_percent"] == pytest.approx(0.72 / total, rel=1e-6)
    assert m["normalized_freq_over_10_percent"] == pytest.approx(0.7 / total, rel=1e-6)
    assert m["average_max_decoder_cosine_sim"] == pytest.approx(float(max_cosine_sims(W_dec).mean()))


def test_downstream_scores_follow_saebench():
    d = {"clean_ce": 2.0, "sae_ce": 2.5, "zero_ce": 7.0, "kl_sae": 0.4, "kl_zero": 5.0, "n_tokens": 100}
    g = downstream_groups(d)
    assert g["model_performance_preservation"]["ce_loss_score"] == pytest.approx((7.0 - 2.5) / (7.0 - 2.0))
    assert g["model_behavior_preservation"]["kl_div_score"] == pytest.approx((5.0 - 0.4) / 5.0)
    assert g["model_performance_preservation"]["ce_loss_without_sae"] == 2.0
    m = CoreMetrics(20, 6)
    for b in _batches():
        m.update(*b)
    section = saebench_core_section(m.compute(), torch.randn(20, 6), torch.randn(20, 6), d)
    assert list(section)[:7] == ["model_behavior_preservation", "model_performance_preservation",
                                 "reconstruction_quality", "shrinkage", "sparsity", "token_stats", "misc_metrics"]
    assert section["token_stats"]["total_tokens_eval_reconstruction"] == 100
    no_lm = saebench_core_section(m.compute(), torch.randn(20, 6), torch.randn(20, 6), None)
    assert "model_performance_preservation" not in no_lm  # SAEBench drops empty groups
