"""lm.py on tiny random GPT-2 and Llama models saved into tmp_path (the 135M model is not loaded here)."""

import pytest
import torch

from lit_sae.data.lm import hook_points, load_lm, model_info, resolve_hook, splice, truncated_forward

N_LAYERS = 3


def _save_tiny(kind: str, path) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(n_layer=N_LAYERS, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = LlamaForCausalLM(config)
    folder = path / kind
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = _save_tiny(request.param, tmp_path_factory.mktemp("lm"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return request.param, folder, model


def test_load_lm_from_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = _save_tiny("llama", tmp_path)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    model, tokenizer = load_lm(folder)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    info = model_info(model)
    assert info["n_layers"] == N_LAYERS and info["architecture"] == "LlamaForCausalLM"
    assert info["name_or_path"] == folder and info["sha256"] is None
    assert tokenizer("a b").input_ids[-2:] == [1, 2]


def test_hook_points_names(tiny):
    _, _, model = tiny
    names = hook_points(model)
    assert len(names) == 8 * N_LAYERS  # every alias of lit_sae.data.hooks.ALIAS_KINDS (tested in test_hooks.py)
    assert "blocks.2.hook_resid_post" in names and "blocks.0.hook_mlp_out" in names
    assert "blocks.1.hook_attn_out" in names


@pytest.mark.parametrize("bad", ["blocks.3.hook_resid_post", "blocks.1.resid", "layer1", "blocks.-1.hook_mlp_out"])
def test_unknown_hook_lists_valid_names(tiny, bad):
    _, _, model = tiny
    with pytest.raises(ValueError) as err:
        resolve_hook(model, bad)
    assert bad in str(err.value) and "blocks.{0..2}.hook_{" in str(err.value) and "resid_post" in str(err.value)


@pytest.mark.parametrize("layer", [0, 1])
def test_truncated_forward_equals_hidden_state(tiny, layer):
    # hidden_states[L + 1] is the output of layer L (the last entry has the final norm, so layer 2 is not compared).
    _, _, model = tiny
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states[layer + 1]
        acts = truncated_forward(model, ids, f"blocks.{layer}.hook_resid_post")
    assert acts.shape == (3, 16, 32)
    torch.testing.assert_close(acts, full, atol=1e-6, rtol=0)


def test_truncated_forward_skips_later_layers(tiny):
    _, _, model = tiny
    called = []
    handles = [layer.register_forward_hook(lambda m, i, o, n=n: called.append(n))
               for n, layer in enumerate(model.base_model.h if hasattr(model.base_model, "h")
                                         else model.base_model.layers)]
    try:
        truncated_forward(model, torch.zeros(1, 4, dtype=torch.long), "blocks.1.hook_attn_out")
    finally:
        for h in handles:
            h.remove()
    assert called == [0]  # layer 0 completes; layer 1 stops inside, after its attention


@pytest.mark.parametrize("kind", ["hook_attn_out", "hook_mlp_out", "hook_resid_post"])
def test_splice_identity_and_zero(tiny, kind):
    _, _, model = tiny
    hook = f"blocks.1.{kind}"
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    module, _ = resolve_hook(model, hook)
    with torch.no_grad():
        ref = model(ids).logits
        with splice(model, hook, lambda a: a):
            same = model(ids).logits
        with splice(model, hook, torch.zeros_like):
            zeroed = model(ids).logits

        # Hand-written zeroing of the same activation, independent of splice().
        def zero_hook(_m, _i, out):
            return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)

        handle = module.register_forward_hook(zero_hook)
        try:
            expected = model(ids).logits
        finally:
            handle.remove()
        after = model(ids).logits
    torch.testing.assert_close(same, ref, atol=0, rtol=0)
    torch.testing.assert_close(zeroed, expected, atol=0, rtol=0)
    assert not torch.allclose(zeroed, ref)
    torch.testing.assert_close(after, ref, atol=0, rtol=0)  # the hook is removed on exit


def test_splice_sees_truncated_activation(tiny):
    _, _, model = tiny
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    seen = []
    with torch.no_grad():
        acts = truncated_forward(model, ids, "blocks.1.hook_mlp_out")
        with splice(model, "blocks.1.hook_mlp_out", lambda a: seen.append(a.clone()) or a):
            model(ids)
    torch.testing.assert_close(seen[0], acts, atol=1e-6, rtol=0)
