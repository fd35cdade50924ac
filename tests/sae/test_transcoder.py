"""Transcoder against a float64 dense reference: code, prediction of the target, losses and every gradient, for the
fast kernels and the reference path, with and without the skip term; scales, b_dec init and the bad-input errors."""

import math

import pytest
import torch

from lit_sae.sae.model import TopKSAE
from lit_sae.sae.transcoder import Transcoder

D_IN, D_OUT, N, K = 20, 12, 64, 5


def make_tc(seed=0, d_out=D_OUT, **kw) -> Transcoder:
    torch.manual_seed(seed)
    tc = Transcoder(D_IN, N, K, d_out=d_out, **kw).double()
    with torch.no_grad():  # non-trivial biases and skip, so that each term matters
        tc.b_pre.normal_()
        tc.b_enc.normal_(0.5, 0.2)
        tc.b_dec.normal_()
        if tc.W_skip is not None:
            tc.W_skip.normal_(0, 0.1)
    return tc


def reference(tc: Transcoder, x, y, dead=None, k_aux=0):
    """Dense float64 transcoder: sort, keep k, ReLU, dense decode plus b_dec and W_skip x; NMSE of y; AuxK on y's
    residual from the top-k_aux dead pre-activations."""
    pre = (x - tc.b_pre) @ tc.W_enc.T + tc.b_enc
    order = pre.argsort(dim=1, descending=True)[:, : tc.k]
    code = torch.zeros_like(pre).scatter(1, order, pre.gather(1, order).clamp_min(0))
    y_hat = code @ tc.W_dec + tc.b_dec
    if tc.W_skip is not None:
        y_hat = y_hat + x @ tc.W_skip.T
    nmse = (y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    aux = torch.zeros((), dtype=x.dtype)
    if dead is not None:
        top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
        aux_code = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp_min(0))
        res = (y - y_hat).detach()
        aux = (aux_code @ tc.W_dec - res).pow(2).sum() / (res - res.mean(0)).pow(2).sum()
    return code, y_hat, nmse, aux


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("skip", [False, True])
def test_forward_and_gradients_match_float64_reference(fast, skip):
    tc = make_tc(fast=fast, skip=skip, k_aux=4)
    ref = make_tc(fast=fast, skip=skip, k_aux=4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, D_IN, dtype=torch.float64, generator=g), torch.randn(40, D_OUT, dtype=torch.float64,
                                                                                 generator=g)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    out = tc(x, dead, target=y)
    code, y_hat, nmse, aux = reference(ref, x, y, dead, 4)
    got = torch.zeros_like(code).scatter(1, out.latent_indices, out.latent_values)
    eps = 1e-12
    torch.testing.assert_close(got, code.detach(), rtol=eps, atol=eps)
    torch.testing.assert_close(out.x_hat, y_hat.detach(), rtol=eps, atol=eps)
    assert float(out.nmse) == pytest.approx(float(nmse), rel=1e-10)
    assert float(out.auxk_loss) == pytest.approx(float(aux), rel=1e-10) and float(aux) > 0
    out.loss.backward()
    (nmse + aux / 32).backward()
    for name, p in tc.named_parameters():
        q = dict(ref.named_parameters())[name]
        if q.grad is None:  # a parameter the objective does not use
            assert p.grad is None or float(p.grad.abs().max()) == 0, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)
    assert (tc.W_skip is not None) == skip and tuple(tc.W_dec.shape) == (N, D_OUT)


def test_decode_and_reconstruct_are_the_prediction():
    tc = make_tc(skip=True)
    x = torch.randn(7, D_IN, dtype=torch.float64)
    _, y_hat, _, _ = reference(tc, x, torch.zeros(7, D_OUT, dtype=torch.float64))
    torch.testing.assert_close(tc.reconstruct(x), y_hat.detach(), rtol=1e-12, atol=1e-12)
    values, indices = tc.encode(x)
    with pytest.raises(ValueError, match="needs the input"):
        tc.decode(values, indices)


@pytest.mark.parametrize("activation,extra", [("batchtopk", {}), ("jumprelu", {"sparsity_coef": 0.01}),
                                              ("relu", {"sparsity_coef": 0.01}),
                                              ("matryoshka_batchtopk", {"matryoshka_prefixes": [16]})])
def test_other_codes_predict_the_target_fast_equals_reference(activation, extra):
    x = torch.randn(30, D_IN, dtype=torch.float64)
    y = torch.randn(30, D_OUT, dtype=torch.float64)
    outs = []
    for fast in (True, False):
        tc = make_tc(fast=fast, skip=True, activation=activation, **extra)
        out = tc(x, target=y)
        out.loss.backward()
        outs.append((out, {n: p.grad for n, p in tc.named_parameters()}))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a.x_hat, b.x_hat, rtol=1e-12, atol=1e-12)
    assert a.x_hat.shape == (30, D_OUT) and float(a.nmse) == pytest.approx(float(b.nmse), rel=1e-12)
    for name in ga:
        if ga[name] is not None:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-9, atol=1e-11, msg=name)


def test_scalar_scales_and_b_dec_init_per_side():
    tc = Transcoder(D_IN, N, K, d_out=D_OUT, normalize="scalar", skip=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, D_IN, generator=g) * 30 + 5
    y = torch.randn(400, D_OUT, generator=g) * 0.1 - 2
    tc.init_from_data_(x, y)
    assert float(tc.norm_scale) == pytest.approx(math.sqrt(D_IN / float(x.double().pow(2).sum(1).mean())), rel=1e-6)
    assert float(tc.target_scale) == pytest.approx(math.sqrt(D_OUT / float(y.double().pow(2).sum(1).mean())),
                                                   rel=1e-6)
    assert float((tc.b_dec / tc.target_scale - y.mean(0)).norm()) < 0.1 * float(y.mean(0).norm())
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.1)
    out = tc(x, target=y)  # the prediction comes back in the target's units; NMSE is the same in both
    y_hat = (tc._decode_n(out.latent_values, out.latent_indices) + tc.b_dec
             + (x * tc.norm_scale) @ tc.W_skip.T) / tc.target_scale
    torch.testing.assert_close(out.x_hat, y_hat, rtol=1e-5, atol=1e-5 * float(y.abs().max()))
    nmse = (out.x_hat - y).double().pow(2).sum() / (y - y.mean(0)).double().pow(2).sum()
    assert float(out.nmse) == pytest.approx(float(nmse), rel=1e-4)
    with pytest.raises(ValueError, match="same N"):
        tc.init_from_data_(x, y[:10])


def test_decoder_constraints_apply_to_the_target_side():
    tc = make_tc()
    tc.normalize_decoder_()  # unit rows in float64 (they were made unit in float32)
    x, y = torch.randn(16, D_IN, dtype=torch.float64), torch.randn(16, D_OUT, dtype=torch.float64)
    tc(x, target=y).loss.backward()
    tc.remove_parallel_grads_()
    assert float((tc.W_dec.grad * tc.W_dec).sum(1).abs().max()) < 1e-12
    with torch.no_grad():
        tc.W_dec.mul_(1.5)
    tc.normalize_decoder_()
    torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.ones(N, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_config_rebuilds_and_the_sae_is_unchanged():
    tc = make_tc(skip=True)
    again = Transcoder(**tc.config())
    assert again.config() == tc.config() and again.k_aux == D_OUT // 2
    torch.manual_seed(0)
    sae = TopKSAE(D_IN, N, K)
    assert sae(torch.randn(4, D_IN)).x_hat.shape == (4, D_IN)  # the SAE's forward takes no target


@pytest.mark.parametrize("call,match", [
    (lambda tc, x, y: tc(x), "needs the target"),
    (lambda tc, x, y: tc(x, target=y[:, :-1]), r"target: expected shape \(B, 12\)"),
    (lambda tc, x, y: tc(x, target=y[:-1]), "same B rows"),
    (lambda tc, x, y: tc(x[:, :-1], target=y), r"x: expected shape \(B, 20\)"),
])
def test_bad_inputs_name_the_argument(call, match):
    tc = make_tc()
    with pytest.raises(ValueError, match=match):
        call(tc, torch.randn(3, D_IN, dtype=torch.float64), torch.randn(3, D_OUT, dtype=torch.float64))


@pytest.mark.parametrize("kw,match", [({"normalize": "layernorm"}, "layernorm"), ({"d_out": 0}, "d_out")])
def test_bad_settings_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        Transcoder(D_IN, N, K, **kw)
