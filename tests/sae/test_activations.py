"""ReLU + L1, JumpReLU, BatchTopK and Matryoshka BatchTopK against float64 dense references: code, loss and gradients (including
the JumpReLU straight-through pseudo-derivative, computed by hand), the L1 warm-up, exports, bad settings."""

import pytest
import torch

from lit_sae.sae.losses import normalized_mse
from lit_sae.sae.model import TopKSAE

D, N, B = 16, 48, 40


def make(activation, seed=0, **kw) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(D, N, 4, activation=activation, **kw).double()
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.3)
        sae.b_enc.normal_(0.0, 0.3)
    return sae


def grads(sae: TopKSAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


def pre_acts(sae, x):
    return (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc


def test_relu_l1_matches_dense_reference_with_openai_normalisation_and_warmup():
    sae = make("relu", sparsity_coef=0.3, sparsity_warmup_steps=4)
    x = torch.randn(B, D, dtype=torch.float64) * 2
    for step in range(3):  # warm-up factor (step + 1) / 4
        out = sae(x)
        got = grads(sae, out.loss)
        z = torch.relu(pre_acts(sae, x))
        recon = z @ sae.W_dec + sae.b_pre
        l1 = (z.abs().sum(dim=1) / x.norm(dim=1)).mean()
        ref_loss = normalized_mse(recon, x) + 0.3 * (step + 1) / 4 * l1
        want = grads(sae, ref_loss)
        torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.sparsity_loss, l1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.x_hat, recon, rtol=1e-12, atol=1e-12)
        assert set(got) == set(want) == {"W_enc", "b_enc", "W_dec", "b_pre"}
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)
    assert int(sae.sparsity_step) == 3
    # the code is packed to the batch's largest L0, which varies: not a fixed k
    l0 = (z > 0).sum(dim=1)
    assert out.latent_values.shape == (B, int(l0.max())) and int(l0.min()) < int(l0.max())
    with torch.no_grad():  # inference: the same code, thresholded at 0
        v, i = sae.eval().encode(x)
    torch.testing.assert_close(torch.zeros_like(z).scatter_(1, i, v), z, rtol=0, atol=0)


def test_jumprelu_matches_dense_reference_and_the_papers_ste_by_hand():
    eps, coef = 0.4, 0.05  # a wide kernel so that many pre-activations fall inside it
    sae = make("jumprelu", sparsity_coef=coef, jumprelu_bandwidth=eps, jumprelu_init_threshold=0.2)
    with torch.no_grad():
        sae.threshold.uniform_(0.05, 0.5)
    x = torch.randn(B, D, dtype=torch.float64)
    out = sae(x)
    got = grads(sae, out.loss)

    theta = sae.threshold.detach()
    pre = pre_acts(sae, x)
    on = ((pre > theta) & (pre > 0)).double()
    z = pre * on  # H treated as a constant: the exact gradient in every weight but theta
    recon = z @ sae.W_dec + sae.b_pre
    l0 = on.sum(dim=1).mean()
    ref_loss = normalized_mse(recon, x) + coef * l0
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.sparsity_loss, l0, rtol=1e-12, atol=1e-12)
    want = grads(sae, ref_loss)
    for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)

    # theta: Rajamanoharan et al. eq. 11-12 with the rectangle kernel, written out per element
    pre, z = pre.detach(), z.detach().requires_grad_(True)
    dL_dz = torch.autograd.grad(normalized_mse(z @ sae.W_dec.detach() + sae.b_pre.detach(), x), z)[0]
    expected = torch.zeros(N, dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            u = (pre[b, i] - theta[i]) / eps
            if -0.5 < float(u) < 0.5:
                expected[i] += dL_dz[b, i] * -(theta[i] / eps) + coef / B * -(1 / eps)
    assert int((expected != 0).sum()) > N // 2  # the check covers most latents
    torch.testing.assert_close(got["threshold"], expected, rtol=1e-10, atol=1e-12)


def test_matryoshka_prefix_losses_match_dense_reference():
    prefixes = [6, 18]
    sae = make("matryoshka_batchtopk", matryoshka_prefixes=prefixes)
    assert sae.matryoshka_prefixes == [6, 18, N]
    x = torch.randn(B, D, dtype=torch.float64)
    out = sae(x)
    got = grads(sae, out.loss)
    acts = torch.relu(pre_acts(sae, x))
    keep = acts.flatten().topk(4 * B).indices
    mask = torch.zeros(B * N, dtype=torch.bool)
    mask[keep] = True
    z = acts * mask.view(B, N)
    losses = [normalized_mse(z[:, :m] @ sae.W_dec[:m] + sae.b_pre, x) for m in (6, 18, N)]
    ref_loss = torch.stack(losses).mean()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.nmse, losses[-1], rtol=1e-12, atol=1e-12)
    want = grads(sae, ref_loss)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)
    assert float(sae.threshold) > 0  # inference threshold learned as for batchtopk


def test_batchtopk_with_auxk_matches_dense_reference():
    """BatchTopK's code (the k*B largest ReLU'd pre-activations of the batch), reconstruction, AuxK on the dead
    latents and every gradient, against a dense float64 computation."""
    sae = make("batchtopk", k_aux=5)
    x = torch.randn(B, D, dtype=torch.float64)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead)
    got = grads(sae, out.loss)
    pre = pre_acts(sae, x)
    acts = torch.relu(pre)
    mask = torch.zeros(B * N, dtype=torch.bool)
    mask[acts.flatten().topk(4 * B).indices] = True
    z = acts * mask.view(B, N)
    recon = z @ sae.W_dec + sae.b_pre
    nmse = normalized_mse(recon, x)
    aux_idx = pre.masked_fill(~dead, float("-inf")).topk(5, dim=1).indices
    aux_z = torch.zeros_like(pre).scatter(1, aux_idx, torch.relu(pre.gather(1, aux_idx)))
    aux = normalized_mse(aux_z @ sae.W_dec, (x - recon).detach())
    ref_loss = nmse + sae.auxk_coef * aux
    assert float(aux) > 0 and int((z > 0).sum()) == 4 * B
    torch.testing.assert_close(out.x_hat, recon, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.auxk_loss, aux, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-12, atol=1e-12)
    want = grads(sae, ref_loss)
    assert set(got) == set(want) == {"W_enc", "b_enc", "W_dec", "b_pre"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation, kw", [("relu", {"sparsity_coef": 0.1}),
                                            ("jumprelu", {"sparsity_coef": 0.01}),
                                            ("matryoshka_batchtopk", {"matryoshka_prefixes": [8, 24]})])
def test_trained_architectures_export_and_load_with_the_same_reconstruction(tmp_path, activation, kw):
    sae = make(activation, **kw).float()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(256, D)
    for _ in range(5):
        opt.zero_grad()
        sae(x).loss.backward()
        opt.step()
        sae.normalize_decoder_()
    sae.eval()
    loaded = TopKSAE.from_pretrained(sae.save_pretrained(tmp_path / "sae"))
    assert loaded.activation == ("relu" if activation == "relu" else "jumprelu")
    torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"activation": "gated"}, "activation='gated'"),
    ({"activation": "relu", "sparsity_coef": -1.0}, "sparsity_coef=-1.0"),
    ({"activation": "jumprelu", "jumprelu_init_threshold": -0.1}, "jumprelu_init_threshold=-0.1"),
    ({"activation": "jumprelu", "jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
    ({"activation": "relu", "sparsity_warmup_steps": -2}, "sparsity_warmup_steps"),
    ({"activation": "matryoshka_batchtopk", "matryoshka_prefixes": [30, 10]}, "matryoshka_prefixes"),
    ({"activation": "topk", "matryoshka_prefixes": [8]}, "matryoshka_prefixes"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        TopKSAE(D, N, 4, **kwargs)
    assert "\n" not in str(info.value)
