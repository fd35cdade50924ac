"""Logit effects and decoder neighbours against float64 dense computations (chunked paths included)."""

import pytest
import torch

from lit_sae.features.decoder import decoder_neighbours, final_norm_and_unembedding, logit_effects


def test_logit_effects_match_float64():
    g = torch.Generator().manual_seed(0)
    W_dec, W_U, gain = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g), torch.rand(16, generator=g)
    tv, ti, bv, bi = logit_effects(W_dec, W_U, gain, n=10, chunk=8)
    ref = (W_dec.double() * gain.double()) @ W_U.double().T
    top, bot = ref.topk(10, dim=1), ref.topk(10, dim=1, largest=False)
    assert torch.equal(ti, top.indices) and torch.equal(bi, bot.indices)
    assert torch.allclose(tv.double(), top.values, atol=1e-5) and torch.allclose(bv.double(), bot.values, atol=1e-5)


@pytest.mark.parametrize("scale", [False, True])
def test_relative_logit_effects_match_float64(scale):
    """Centred on the mean over latents (and, with scale, divided by each token's standard deviation over
    latents): the dense float64 effect matrix, centred and standardised per token column."""
    g = torch.Generator().manual_seed(2)
    W_dec, W_U, gain = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g), torch.rand(16, generator=g)
    W_U[3] *= 20  # a token whose effect is large under every latent: it wins the raw tables, not the z-scores
    tv, ti, bv, bi = logit_effects(W_dec, W_U, gain, n=10, chunk=8, center=True, scale=scale)
    ref = (W_dec.double() * gain.double()) @ W_U.double().T
    ref = ref - ref.mean(0)
    if scale:
        ref = ref / ref.std(0)
    top, bot = ref.topk(10, dim=1), ref.topk(10, dim=1, largest=False)
    assert torch.equal(ti, top.indices) and torch.equal(bi, bot.indices)
    # fp32 products of length 16 and a 16x16 covariance: relative error ~1e-6 of values of order 1-100
    assert torch.allclose(tv.double(), top.values, rtol=1e-4, atol=1e-4)
    if scale:  # token 3 is at an extreme of nearly every raw table; as a z-score, of about 20/50 of them (sd 0.08)
        _, rti, _, rbi = logit_effects(W_dec, W_U, gain, n=10, chunk=8)
        assert ((rti == 3) | (rbi == 3)).any(1).float().mean() > 0.9
        assert ((ti == 3) | (bi == 3)).any(1).float().mean() < 0.65


def test_neighbours_match_float64():
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randn(41, 12, generator=g) * torch.rand(41, 1, generator=g)  # rows of any norm
    cos, ids = decoder_neighbours(W_dec, n=5, chunk=7)
    W = W_dec.double() / W_dec.double().norm(dim=1, keepdim=True)
    sim = W @ W.T
    sim.fill_diagonal_(-2)
    ref = sim.topk(5, dim=1)
    assert torch.equal(ids, ref.indices) and torch.allclose(cos.double(), ref.values, atol=1e-6)
    assert not (ids == torch.arange(41)[:, None]).any()


def test_final_norm_and_unembedding_of_llama_and_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=40))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8))
    for model, norm in ((llama, llama.model.norm), (gpt2, gpt2.transformer.ln_f)):
        gain, W_U = final_norm_and_unembedding(model)
        assert gain is norm.weight or torch.equal(gain, norm.weight)
        assert W_U.shape == (40, 16)
    with pytest.raises(ValueError, match="no output embedding"):
        final_norm_and_unembedding(torch.nn.Linear(2, 2))
