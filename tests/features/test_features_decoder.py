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
