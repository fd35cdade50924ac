"""Ablation sparsity on a hand-built GPT-2 where one latent's decoder row moves exactly one logit."""

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from lit_sae.eval.ablation import ablation_sparsity, concentration

V, D, T, J = 512, 32, 10, 7  # vocab, width, context length, the one logit latent 0 moves


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
def one_logit_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=V, n_positions=32, n_embd=D, n_layer=2,
                                                n_head=4)).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # Hook at the last block's output; without the final norm the logits are linear in it: logits = W_U a.
    model.transformer.ln_f = nn.Identity()
    with torch.no_grad():
        W_U = model.lm_head.weight  # tied to wte
        W_U[:, 0] = 0
        W_U[J] = 0
        W_U[J, 0] = 0.02  # direction e_0 reaches logit J only (at the scale of the other entries, std 0.02)
    return model


def test_concentration_reference_values():
    one = torch.zeros(3, 1000)
    one[:, 3] = 2.0
    assert concentration(one)[0] == pytest.approx(4 * 999 / 1000 / 1000, rel=1e-6)
    gauss = torch.randn(50, 4000, generator=torch.Generator().manual_seed(0))
    assert concentration(gauss)[0] == pytest.approx(2 / math.pi, abs=0.01)
    # concat is diluted by unaffected positions; score is not.
    padded = torch.cat([gauss[:1], torch.zeros(3, 4000)])
    assert concentration(padded)[0] == pytest.approx(concentration(gauss[:1])[0], rel=1e-9)
    assert concentration(padded)[1] == pytest.approx(concentration(gauss[:1])[1] / 4, rel=1e-9)


def test_one_logit_latent_is_sparse_random_direction_is_gaussian(one_logit_model):
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(8, D, generator=g)
    W_dec[0] = 0
    W_dec[0, 0] = 1.0
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    sae = LinearTopK(W_dec, k=8)
    ids = torch.randint(0, V, (8, T), generator=g)
    out = ablation_sparsity(one_logit_model, "blocks.1.hook_resid_post", sae, ids, latents=[0],
                            contexts_per_latent=8, progress=False)
    (res,) = out["latents"]
    assert res["score"] < 5 / V  # one logit moves: 4 (V-1) / V^2 after removing the mean shift
    assert res["random"] == pytest.approx(2 / math.pi, abs=0.04)
    assert out["n_latents"] == 1 and res["n_contexts"] == 8


def test_random_sample_of_latents(one_logit_model):
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randn(16, D, generator=g)
    sae = LinearTopK(W_dec / W_dec.norm(dim=1, keepdim=True), k=4)
    ids = torch.randint(0, V, (6, T), generator=g)
    out = ablation_sparsity(one_logit_model, "blocks.1.hook_resid_post", sae, ids, n_latents=5,
                            contexts_per_latent=2, progress=False)
    assert out["n_latents"] == 5
    # Random decoder rows are random directions for this linear readout: near the Gaussian value too.
    assert out["mean"] == pytest.approx(2 / math.pi, abs=0.06)
    assert out["random_mean"] == pytest.approx(2 / math.pi, abs=0.06)
