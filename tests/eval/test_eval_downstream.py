"""Downstream loss on tiny random transformers models saved locally (GPT-2 and Llama configs)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lit_sae.data.lm import resolve_hook
from lit_sae.eval.downstream import downstream_loss, mean_activation

V, T = 97, 12


def _save_and_load(config, path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_lm(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=3, n_head=4)
    else:
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return _save_and_load(cfg, path)


def _ids(n=6, seed=0):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"])
def test_identity_sae_has_zero_delta_ce_and_kl(tiny_lm, hook):
    out = downstream_loss(tiny_lm, hook, lambda x: x, _ids(), batch_size=4, progress=False)
    assert abs(out["delta_ce"]) < 1e-5 and abs(out["kl_sae"]) < 1e-5
    assert out["zero_ce"] != pytest.approx(out["clean_ce"], abs=1e-4)  # the splice does act on the model
    assert out["frac_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert out["n_tokens"] == 6 * (T - 2) and out["n_spliced"] == 6 * (T - 1)


def _hand_forward_ce(model, ids, hook, replace):
    """CE at positions >= 1 with the hook module's output replaced at positions >= 1 by replace(a)."""
    module, _ = resolve_hook(model, hook)

    def h(_m, _i, output):
        a = output[0] if isinstance(output, tuple) else output
        a = a.clone()
        a[:, 1:] = replace(a[:, 1:])
        return (a, *output[1:]) if isinstance(output, tuple) else a

    handle = module.register_forward_hook(h)
    try:
        logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    lp = F.log_softmax(logits[:, 1:-1].double(), -1)
    return -lp.gather(-1, ids[:, 2:, None]).mean().item()


def test_zero_and_mean_ablation_match_hand_written_forward(tiny_lm):
    hook, ids = "blocks.0.hook_resid_post", _ids()
    out = downstream_loss(tiny_lm, hook, lambda x: x, ids, batch_size=4, progress=False)
    with torch.no_grad():
        zero = _hand_forward_ce(tiny_lm, ids, hook, torch.zeros_like)
        mean = mean_activation(tiny_lm, hook, ids)
        mean_ce = _hand_forward_ce(tiny_lm, ids, hook, lambda a: mean.float().expand_as(a))
        clean = _hand_forward_ce(tiny_lm, ids, hook, lambda a: a)
    assert out["zero_ce"] == pytest.approx(zero, abs=1e-5)
    assert out["mean_ce"] == pytest.approx(mean_ce, abs=1e-5)
    assert out["clean_ce"] == pytest.approx(clean, abs=1e-5)
    # Random-init models sit near uniform: CE close to log V.
    assert abs(out["clean_ce"] - math.log(V)) < 0.5


def test_noisy_sae_is_between_clean_and_zero(tiny_lm):
    g = torch.Generator().manual_seed(1)
    out = downstream_loss(tiny_lm, "blocks.1.hook_resid_post", lambda x: x + 0.3 * x.std() * torch.randn(
        x.shape, generator=g), _ids(), ablations=("zero",), progress=False)
    assert out["kl_sae"] > 0 and out["kl_zero"] > out["kl_sae"]
    assert "mean_ce" not in out
