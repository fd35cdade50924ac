"""Ablation sparsity (Gao et al. 2024, s4.5) on hand-built GPT-2s whose unembedding makes some directions' effects
sparse: the metric must tell those latents from residual-stream basis directions and random directions."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from lit_sae.eval.ablation import ablation_sparsity, effect_sparsity

V, D, T = 512, 32, 10  # vocab, width, context length
SPARSE = 8  # channels 0..7 each reach one logit only (token 100 + j); the other 24 reach every logit


class LinearTopK(nn.Module):
    """Minimal SAE: code = top-k of ReLU((x - b_pre) W_dec^T), x_hat = sum v W_dec[i] + b_pre."""

    def __init__(self, W_dec, k):
        super().__init__()
        self.W_dec, self.k, self.n_latents = nn.Parameter(W_dec), k, W_dec.shape[0]
        self.b_pre = nn.Parameter(torch.zeros(W_dec.shape[1]))

    def encode(self, x, return_info=False):
        v, i = ((x - self.b_pre) @ self.W_dec.T).topk(self.k, dim=-1)
        return (v.relu(), i, None) if return_info else (v.relu(), i)

    def decode(self, v, i, info=None):
        return (v[..., None] * self.W_dec[i]).sum(-2) + self.b_pre


@pytest.fixture(scope="module")
def sparse_readout_model(tmp_path_factory):
    """Hook at the last block's output, no final norm: logits = W_U a. Columns 0..7 of W_U have one non-zero entry."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=V, n_positions=32, n_embd=D, n_layer=2,
                                                n_head=4)).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.transformer.ln_f = nn.Identity()
    with torch.no_grad():
        W_U = model.lm_head.weight  # (V, D), std 0.02
        W_U[:, :SPARSE] = 0
        for j in range(SPARSE):
            W_U[100 + j] = 0
            W_U[100 + j, j] = 0.02
    return model


def test_effect_sparsity_reference_values():
    one = torch.zeros(4, 1000)
    one[1, 3] = 2.0
    assert effect_sparsity(one) == pytest.approx(1 / 4000, rel=1e-12)  # one logit of V * window
    shifted = one + torch.arange(4.0)[:, None]  # a constant shift per position changes no probability
    assert effect_sparsity(shifted) == pytest.approx(1 / 4000, rel=1e-12)
    gauss = torch.randn(16, 4000, generator=torch.Generator().manual_seed(0))
    assert effect_sparsity(gauss) == pytest.approx(2 / math.pi, abs=0.01)
    # Concatenation: a window where only the first position moves is 1/window as dense.
    padded = torch.cat([gauss[:1], torch.zeros(3, 4000)])
    assert effect_sparsity(padded) == pytest.approx(effect_sparsity(gauss[:1]) / 4, rel=1e-9)
    assert math.isnan(effect_sparsity(torch.ones(2, 10)))


def test_sparse_latents_beat_basis_and_random_directions(sparse_readout_model):
    """Latents along channels 0..7 move one logit at the ablated position and nothing after (the hook is the last
    block): exactly 1 / (V * window). Basis channels are sparse only for 8 of 32; random directions are dense."""
    g = torch.Generator().manual_seed(0)
    sae = LinearTopK(torch.eye(D)[:SPARSE].clone(), k=SPARSE)
    ids = torch.randint(0, V, (12, T), generator=g)
    out = ablation_sparsity(sparse_readout_model, "blocks.1.hook_resid_post", sae, ids, n_latents=SPARSE,
                            contexts_per_latent=4, window=3, batch_size=7, progress=False)
    assert out["n_latents"] == SPARSE and out["window"] == 3
    for r in out["latents"]:
        assert r["n_contexts"] == 4
        assert r["score"] == pytest.approx(1 / (3 * V), rel=1e-4)
    # Gaussian logit change at 1 of 3 positions: (2/pi) / 3 ~ 0.21; basis: 3/4 of channels dense.
    assert out["random_mean"] == pytest.approx(2 / math.pi / 3, abs=0.03)
    assert 0.1 < out["basis_mean"] < 0.2
    assert out["basis_mean"] > 100 * out["mean"]


def test_dense_latents_look_like_random_directions(sparse_readout_model):
    """Decoder rows in the dense channels: no difference from random directions (what a tied, dense readout gives)."""
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randn(16, D, generator=g)
    W_dec[:, :SPARSE] = 0
    sae = LinearTopK(W_dec / W_dec.norm(dim=1, keepdim=True), k=4)
    ids = torch.randint(0, V, (6, T), generator=g)
    out = ablation_sparsity(sparse_readout_model, "blocks.1.hook_resid_post", sae, ids, n_latents=5,
                            contexts_per_latent=2, window=1, progress=False)
    assert out["n_latents"] == 5
    assert out["mean"] == pytest.approx(2 / math.pi, abs=0.06)
    assert out["mean"] == pytest.approx(out["random_mean"], abs=0.06)


def test_bad_window(sparse_readout_model):
    sae = LinearTopK(torch.eye(D)[:4].clone(), k=4)
    with pytest.raises(ValueError, match="window"):
        ablation_sparsity(sparse_readout_model, "blocks.1.hook_resid_post", sae, torch.zeros(2, T, dtype=torch.long),
                          window=0, progress=False)
