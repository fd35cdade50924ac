"""Hook points (lit_sae/data/hooks.py) on tiny random models of each architecture, saved with save_pretrained.

Every alias is checked against a direct computation from other tensors of the same forward (TransformerLens's
block arithmetic) or from the model's own modules applied by hand. Tolerances: the identities are single float32
additions or the same module on the same input, so they hold to a few float32 ulps (torch's default fp32 tolerance,
rtol 1.3e-6 / atol 1e-5, is far above that and far below the activations' size, about 1).
"""

import pytest
import torch

from lit_sae.data.hooks import HookPointError, decoder_layers, hook_points, resolve_site
from lit_sae.data.lm import splice, truncated_forward, truncated_forward_many

N_LAYERS = 3
D = 32
KINDS = ("hook_resid_pre", "ln1.hook_normalized", "hook_attn_out", "hook_resid_mid", "hook_mlp_in",
         "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post")


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=96, bos_token_id=0, eos_token_id=0)
    llama_like = dict(num_hidden_layers=N_LAYERS, hidden_size=D, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **common)
    return {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "gemma": lambda: tf.GemmaConfig(head_dim=8, **llama_like),
        "gpt2": lambda: tf.GPT2Config(n_layer=N_LAYERS, n_embd=D, n_head=4, n_positions=64, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(num_hidden_layers=N_LAYERS, hidden_size=D, intermediate_size=64,
                                             num_attention_heads=4, max_position_embeddings=64, **common),
        "gpt_neox_sequential": lambda: tf.GPTNeoXConfig(
            num_hidden_layers=N_LAYERS, hidden_size=D, intermediate_size=64, num_attention_heads=4,
            max_position_embeddings=64, use_parallel_residual=False, **common),
    }[arch]()


ARCHS = ["llama", "qwen2", "gemma", "gpt2", "gpt_neox", "gpt_neox_sequential"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(_config(request.param)).save_pretrained(folder)
    return request.param, AutoModelForCausalLM.from_pretrained(folder).eval()


def _ids(seed=1):
    return torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(seed))


def _parts(layer):
    """(pre-attention norm, pre-MLP norm, MLP) of a decoder layer, found by hand for the tested architectures."""
    ln1 = getattr(layer, "input_layernorm", None) or layer.ln_1
    ln2 = getattr(layer, "post_attention_layernorm", None) or layer.ln_2
    return ln1, ln2, layer.mlp


def test_every_alias_matches_block_arithmetic(tiny):
    arch, model = tiny
    names = hook_points(model)
    parallel = arch == "gpt_neox"
    ids = _ids()
    with torch.no_grad():
        acts = truncated_forward_many(model, ids, names)
        hidden = model(ids, output_hidden_states=True).hidden_states
    layers = decoder_layers(model)
    for L in range(N_LAYERS):
        a = {k: acts.get(f"blocks.{L}.{k}") for k in KINDS}
        ln1, ln2, mlp = _parts(layers[L])
        assert (a["hook_resid_mid"] is None) == parallel
        torch.testing.assert_close(a["hook_resid_pre"], hidden[L])  # block L's input (L=0: the embeddings)
        if L < N_LAYERS - 1:  # the last hidden state has the final norm applied
            torch.testing.assert_close(a["hook_resid_post"], hidden[L + 1])
            torch.testing.assert_close(acts[f"blocks.{L + 1}.hook_resid_pre"], a["hook_resid_post"])
        with torch.no_grad():
            torch.testing.assert_close(a["ln1.hook_normalized"], ln1(a["hook_resid_pre"]))
            torch.testing.assert_close(a["ln2.hook_normalized"], ln2(a["hook_mlp_in"]))
            torch.testing.assert_close(a["hook_mlp_out"], mlp(a["ln2.hook_normalized"]))
        if parallel:  # TransformerLens: mlp_in is resid_pre; both sublayers add to it
            torch.testing.assert_close(a["hook_mlp_in"], a["hook_resid_pre"])
            torch.testing.assert_close(a["hook_resid_post"], a["hook_resid_pre"] + a["hook_attn_out"]
                                       + a["hook_mlp_out"])
        else:
            torch.testing.assert_close(a["hook_resid_mid"], a["hook_resid_pre"] + a["hook_attn_out"])
            torch.testing.assert_close(a["hook_mlp_in"], a["hook_resid_mid"])  # before ln2, as in TransformerLens
            torch.testing.assert_close(a["hook_resid_post"], a["hook_resid_mid"] + a["hook_mlp_out"])


def test_module_paths_and_short_spellings(tiny):
    _, model = tiny
    layers = decoder_layers(model)
    path = next(p for p, m in model.named_modules() if m is layers[1].mlp)
    names = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", f"{path}:input", f"{path}:output",
             "blocks.1.resid_pre", "blocks.1.hook_resid_pre"]
    with torch.no_grad():
        acts = truncated_forward_many(model, _ids(), names)
    torch.testing.assert_close(acts[f"{path}:input"], acts["blocks.1.ln2.hook_normalized"], atol=0, rtol=0)
    torch.testing.assert_close(acts[f"{path}:output"], acts["blocks.1.hook_mlp_out"], atol=0, rtol=0)
    torch.testing.assert_close(acts["blocks.1.resid_pre"], acts["blocks.1.hook_resid_pre"], atol=0, rtol=0)
    assert resolve_site(model, f"{path}:input").layer == 1


def test_one_forward_stops_after_the_deepest(tiny):
    _, model = tiny
    called = []
    handles = [layer.register_forward_hook(lambda m, i, o, n=n: called.append(n))
               for n, layer in enumerate(decoder_layers(model))]
    try:
        with torch.no_grad():
            acts = truncated_forward_many(model, _ids(), ["blocks.1.hook_mlp_in", "blocks.0.hook_resid_post"])
    finally:
        for h in handles:
            h.remove()
    assert called == [0] and set(acts) == {"blocks.1.hook_mlp_in", "blocks.0.hook_resid_post"}
    with torch.no_grad():  # one hook alone gives the same tensor as within several
        alone = truncated_forward(model, _ids(), "blocks.1.hook_mlp_in")
    torch.testing.assert_close(alone, acts["blocks.1.hook_mlp_in"], atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["hook_resid_pre", "hook_resid_mid", "hook_mlp_in", "ln2.hook_normalized"])
def test_splice_input_sites(tiny, kind):
    """Identity splices leave the logits alone; a shift at resid_mid moves the residual as TransformerLens's does."""
    arch, model = tiny
    name = f"blocks.1.{kind}"
    if arch == "gpt_neox" and kind == "hook_resid_mid":
        pytest.skip("parallel blocks have no resid_mid")
    ids = _ids(2)
    shift = torch.linspace(-1, 1, D)
    with torch.no_grad():
        ref = model(ids).logits
        with splice(model, name, lambda a: a):
            same = model(ids).logits
        with splice(model, name, lambda a: a + shift):
            moved = truncated_forward_many(model, ids, [name, "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out",
                                                        "blocks.1.hook_resid_pre"])
        plain = truncated_forward_many(model, ids, [name, "blocks.1.hook_resid_pre"])
    torch.testing.assert_close(same, ref, atol=0, rtol=0)
    torch.testing.assert_close(moved[name], plain[name] + shift)  # a later read sees the spliced value
    if kind == "hook_resid_mid":  # resid_post = spliced resid_mid + the MLP's output on it
        torch.testing.assert_close(moved["blocks.1.hook_resid_post"], moved[name] + moved["blocks.1.hook_mlp_out"])
    if kind in ("hook_mlp_in", "ln2.hook_normalized"):  # only the MLP sees it: the block's input is untouched
        torch.testing.assert_close(moved["blocks.1.hook_resid_pre"], plain["blocks.1.hook_resid_pre"], atol=0, rtol=0)


@pytest.mark.parametrize("bad", ["blocks.3.hook_resid_post", "blocks.10.hook_resid_pre", "blocks.1.resid",
                                 "blocks.1.hook_resid_pos", "layer1", "model.layers.1.mlp", "blocks.-1.hook_mlp_out"])
def test_unknown_names_list_what_exists_and_never_guess_another_place(tiny, bad):
    _, model = tiny
    with pytest.raises(HookPointError) as err:
        resolve_site(model, bad)
    msg = str(err.value)
    assert "\n" not in msg and bad in msg and "blocks.{0..2}.hook_{resid_pre" in msg and ":input" in msg
    assert "did you mean" not in msg  # none of these is the same place spelled differently


def test_did_you_mean_only_for_the_same_place(tiny):
    _, model = tiny
    layers = decoder_layers(model)
    path = next(p for p, m in model.named_modules() if m is layers[1].mlp)
    with pytest.raises(HookPointError, match=r"did you mean 'blocks\.1\.hook_resid_pre'"):
        resolve_site(model, "blocks.1.HOOK_RESID_PRE")
    typo = path.replace("mlp", "mpl")
    with pytest.raises(HookPointError, match=rf"did you mean '{path}:input'"):
        resolve_site(model, f"{typo}:input")
    other_layer = path.replace(".1.", ".7.")  # a layer that does not exist is never "corrected" to another layer
    with pytest.raises(HookPointError) as err:
        resolve_site(model, f"{other_layer}:input")
    assert "did you mean" not in str(err.value)


def test_parallel_blocks_say_why_there_is_no_resid_mid(tiny):
    arch, model = tiny
    if arch != "gpt_neox":
        pytest.skip("only GPT-NeoX's default blocks are parallel")
    with pytest.raises(HookPointError, match="parallel"):
        resolve_site(model, "blocks.0.hook_resid_mid")
