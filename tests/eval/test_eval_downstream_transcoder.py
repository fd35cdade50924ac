"""Downstream loss of a transcoder: the prediction from the MLP's input replaces the MLP's output in the same
forward. The MLP itself as the "transcoder" leaves the LM unchanged (delta CE and KL 0), a zero prediction equals
zero ablation, and a lit-sae Transcoder goes through the same path (tiny GPT-2 and Llama)."""

import copy

import pytest
import torch

from lit_sae.data.hooks import child, decoder_layers
from lit_sae.eval.downstream import downstream_loss
from lit_sae.sae.transcoder import Transcoder
from tests.eval.test_eval_downstream import V, _ids, tiny_lm  # noqa: F401 (fixture)

IN, OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def _mlp(model):  # a copy: the LM's own MLP carries the splice's hooks during the evaluation
    return copy.deepcopy(child(decoder_layers(model)[1], ("mlp",)))


def test_the_mlp_itself_changes_nothing_and_zero_equals_zero_ablation(tiny_lm):  # noqa: F811
    mlp = _mlp(tiny_lm)
    same = downstream_loss(tiny_lm, OUT, lambda x: mlp(x[None])[0], _ids(), batch_size=3, progress=False,
                           input_hook_point=IN)
    assert abs(same["delta_ce"]) < 1e-5 and abs(same["kl_sae"]) < 1e-5 and same["input_hook_point"] == IN
    zero = downstream_loss(tiny_lm, OUT, lambda x: torch.zeros_like(x), _ids(), batch_size=3, progress=False,
                           input_hook_point=IN)
    assert zero["sae_ce"] == pytest.approx(zero["zero_ce"], abs=1e-6) and zero["zero_ce"] != pytest.approx(
        zero["clean_ce"], abs=1e-4)


def test_a_transcoder_is_spliced_from_its_input(tiny_lm):  # noqa: F811
    d = tiny_lm.config.hidden_size if hasattr(tiny_lm.config, "hidden_size") else tiny_lm.config.n_embd
    torch.manual_seed(0)
    tc = Transcoder(d, 64, 4, skip=True).eval()
    with torch.no_grad():  # the skip term alone, set to a linear fit of nothing: prediction = b_dec exactly
        tc.b_dec.zero_()
        tc.b_enc.fill_(-1e4)  # no latent fires; topk still keeps k values, relu'd to 0
    out = downstream_loss(tiny_lm, OUT, tc, _ids(), batch_size=3, progress=False, input_hook_point=IN)
    assert out["sae_ce"] == pytest.approx(out["zero_ce"], abs=1e-5)
    with torch.no_grad():
        tc.W_skip.normal_()
    moved = downstream_loss(tiny_lm, OUT, tc, _ids(), batch_size=3, progress=False, input_hook_point=IN)
    assert moved["sae_ce"] != pytest.approx(out["sae_ce"], abs=1e-4)  # the prediction reads the captured input
