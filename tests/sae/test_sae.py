"""TopKSAE against float64 references: encode/decode, decoder constraints, geometric median, AuxK, normalisation."""

import math

import pytest
import torch

from lit_sae.artifacts.export import export_sae, load_exported
from lit_sae.sae.losses import normalized_mse
from lit_sae.sae.median import geometric_median
from lit_sae.sae.model import TopKSAE


def make_sae(d_in=24, n=96, k=6, seed=0, **kw) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(d_in, n, k, **kw).double()
    with torch.no_grad():  # non-trivial biases so that b_pre and b_enc both matter
        sae.b_pre.normal_()
        sae.b_enc.normal_(0.5, 0.2)
    return sae


def reference_forward(sae: TopKSAE, x: torch.Tensor):
    """Straightforward dense float64 TopK SAE: sort, keep k, ReLU, dense decode."""
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    order = pre.argsort(dim=1, descending=True)[:, : sae.k]
    code = torch.zeros_like(pre)
    code.scatter_(1, order, pre.gather(1, order).clamp_min(0))
    return code, code @ sae.W_dec + sae.b_pre


@pytest.mark.parametrize("fast", [True, False])
def test_forward_matches_float64_reference(fast):
    sae = make_sae(fast=fast)
    x = torch.randn(50, 24, dtype=torch.float64)
    code_ref, x_hat_ref = reference_forward(sae, x)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (50, 6)
    code = torch.zeros_like(code_ref).scatter_(1, indices, values)
    torch.testing.assert_close(code, code_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae.decode(values, indices), x_hat_ref, rtol=1e-12, atol=1e-12)
    out = sae(x)
    torch.testing.assert_close(out.x_hat.double(), x_hat_ref, rtol=1e-6, atol=1e-6)
    # b_enc ~ 0.5 makes every kept pre-activation positive: exactly k nonzeros per token
    assert bool(((code_ref > 0).sum(dim=1) == 6).all())
    assert bool(((values > 0).sum(dim=1) == 6).all())


def test_batchtopk_keeps_k_times_batch_and_uses_threshold_at_inference():
    sae = make_sae(activation="batchtopk")
    x = torch.randn(40, 24, dtype=torch.float64)
    sae.train()
    out = sae(x)
    assert int((out.latent_values > 0).sum()) == 6 * 40
    per_token = (out.latent_values > 0).sum(dim=1)
    assert int(per_token.max()) > int(per_token.min())  # varies per token, unlike TopK
    pre = sae.pre_acts(x).detach().clamp_min(0)
    assert float(sae.threshold) == pytest.approx(float(pre.flatten().topk(240).values.min()), rel=1e-12)
    sae.eval()
    out = sae(x)
    assert int((out.latent_values > 0).sum()) == int((pre > sae.threshold).sum())


def test_decoder_gradient_projection_and_renormalisation():
    sae = make_sae().float()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 24)
    sae(x).loss.backward()
    sae.remove_parallel_grads_()
    g, W = sae.W_dec.grad, sae.W_dec.detach()
    touched = g.norm(dim=1) > 1e-6
    assert int(touched.sum()) > 20
    cos = (g * W).sum(1)[touched] / (g.norm(dim=1)[touched] * W.norm(dim=1)[touched])
    assert float(cos.abs().max()) < 1e-5
    opt.step()
    assert float((sae.W_dec.norm(dim=1) - 1).abs().max()) > 1e-4  # the step itself leaves the sphere...
    sae.normalize_decoder_()
    assert float((sae.W_dec.norm(dim=1) - 1).abs().max()) < 1e-5  # ...and renormalisation brings it back


def test_encoder_initialised_as_decoder_transpose():
    sae = TopKSAE(16, 40, 4, encoder_init_norm=0.5)
    torch.testing.assert_close(sae.W_enc.data, 0.5 * sae.W_dec.data)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))


def test_geometric_median_matches_reference_and_resists_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g, dtype=torch.float64)
    x[:20] += 1000.0  # 5% far outliers drag the mean, not the median
    med = geometric_median(x).double()

    def cost(p):
        return (x - p).norm(dim=1).sum()

    # reference: many more iterations of plain gradient descent on the convex objective, in float64
    p = x.median(dim=0).values.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([p], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        c = cost(p)
        c.backward()
        return c

    opt.step(closure)
    assert float((med - p.detach()).norm()) < 1e-3
    assert float(cost(med)) <= float(cost(p.detach())) + 1e-6
    assert float((med - x.mean(dim=0)).norm()) > 40  # the mean moved ~50 towards the outliers


def test_auxk_equals_hand_computation_and_is_zero_when_nothing_dead():
    sae = make_sae(k_aux=4)
    x = torch.randn(30, 24, dtype=torch.float64)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead)
    _, x_hat = reference_forward(sae, x)
    residual = x - x_hat
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    pre_dead = pre.masked_fill(~dead, float("-inf"))
    top = pre_dead.topk(4, dim=1)
    code = torch.zeros_like(pre).scatter_(1, top.indices, top.values.clamp_min(0))
    aux_recon = code @ sae.W_dec  # no b_pre in the auxiliary reconstruction
    expected = (aux_recon - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    assert float(out.auxk_loss) == pytest.approx(float(expected), rel=1e-9)
    assert float(out.loss) == pytest.approx(float(out.nmse + out.auxk_loss / 32), rel=1e-9)
    none = sae(x, torch.zeros(96, dtype=torch.bool))
    assert float(none.auxk_loss) == 0.0 and math.isfinite(float(none.loss))
    assert float(none.loss) == pytest.approx(float(none.nmse), rel=1e-12)


def test_multi_topk_loss():
    sae = make_sae(multi_topk=True)
    x = torch.randn(30, 24, dtype=torch.float64)
    out = sae(x)
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    top = pre.topk(24, dim=1)
    code = torch.zeros_like(pre).scatter_(1, top.indices, top.values.clamp_min(0))
    expected = normalized_mse(code @ sae.W_dec + sae.b_pre, x)
    assert float(out.multik_loss) == pytest.approx(float(expected), rel=1e-9)
    assert float(out.loss) == pytest.approx(float(out.nmse + expected / 8), rel=1e-9)


def test_scalar_normalisation_and_export_folding(tmp_path):
    sae = make_sae(normalize="scalar")
    x = 7.0 * torch.randn(500, 24, dtype=torch.float64) + 3.0
    sae.init_from_data_(x)
    x_n, _ = sae.normalize_input(x)
    assert float(x_n.pow(2).sum(1).mean()) == pytest.approx(24.0, rel=1e-5)
    assert float((sae.b_pre.double() - geometric_median(x_n).double()).abs().max()) < 1e-5
    sae = sae.float()
    x = x.float()
    x_hat = sae(x).x_hat
    export_sae(sae, tmp_path / "sae", hook_point="blocks.3.hook_resid_post", lm_name="tiny")
    loaded, cfg = load_exported(tmp_path / "sae")
    assert cfg["hook_layer"] == 3 and cfg["k"] == 6 and cfg["d_sae"] == 96
    assert loaded.normalize == "none"  # folded: the export takes raw activations
    torch.testing.assert_close(loaded(x).x_hat, x_hat, rtol=1e-4, atol=1e-4)


def test_layernorm_normalisation_roundtrip():
    sae = make_sae(normalize="layernorm")
    x = 5 * torch.randn(20, 24, dtype=torch.float64) + 2
    x_n, state = sae.normalize_input(x)
    assert float(x_n.mean(-1).abs().max()) < 1e-12
    assert float((x_n.std(-1) - 1).abs().max()) < 1e-5
    # As OpenAI's LN and SAELens's layer_norm: eps joins std on the way in only, decoding multiplies by std
    mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
    torch.testing.assert_close(sae.denormalize(x_n, state), (x - mu) * std / (std + 1e-5) + mu)
    values, indices, info = sae.encode(x, return_info=True)
    torch.testing.assert_close(sae(x).x_hat, sae.decode(values, indices, info))
    torch.testing.assert_close(sae.reconstruct(x), sae(x).x_hat)
    assert len(sae.encode(x)) == 2  # the two-value form callers used before stays


@pytest.mark.parametrize(
    "kwargs, match",
    [({"k": 0}, "k=0"), ({"k": 200}, "n_latents=96"), ({"k_aux": 0}, "k_aux"), ({"normalize": "x"}, "normalize")],
)
def test_bad_config_is_rejected_with_the_key(kwargs, match):
    args = {"d_in": 24, "n_latents": 96, "k": 6} | kwargs
    with pytest.raises(ValueError, match=match):
        TopKSAE(args.pop("d_in"), args.pop("n_latents"), args.pop("k"), **args)
