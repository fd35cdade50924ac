"""Chat data for the LM stream: JSONL conversations through the tokenizer's chat template, special tokens dropped
like position 0, a malformed line named by file:line (tiny random GPT-2, byte tokenizer with a chat template)."""

import json

import numpy as np
import pytest
import torch

from lit_sae.data.chat import chat_source, special_token_ids
from lit_sae.data.lm_stream import LMStreamDataModule
from lit_sae.data.lm_stream.rows import lm_rows

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def chat_world(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("chat")
    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(root / "lm")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(fast), n_positions=64)).save_pretrained(
        root / "lm")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "def", "return", "(x)"]
    with open(root / "chats.jsonl", "w") as f:
        for _ in range(60):
            turns = [{"role": r, "content": " ".join(rng.choice(words, size=int(rng.integers(5, 40))))}
                     for r in ("user", "assistant") * 2]
            f.write(json.dumps({"messages": turns}) + "\n")
    return root


def _dm(root, **kw):
    return LMStreamDataModule(model=str(root / "lm"), hook_point="blocks.1.hook_resid_post",
                              source=str(root / "chats.jsonl"), chat=True, total_tokens=3000, context_length=32,
                              batch_size=8, val_fraction=0.1, test_fraction=0.1, batch_size_tokens=64,
                              shuffle_buffer_tokens=256, norm_filter_multiple=None, **kw)


def test_conversations_render_through_the_template_and_special_rows_are_dropped(chat_world):
    dm = _dm(chat_world)
    special = special_token_ids(dm.tokenizer)
    assert len(special) >= 2
    doc = next(iter(dm.text.documents()))
    first = json.loads((chat_world / "chats.jsonl").read_text().splitlines()[0])["messages"]
    assert doc == dm.tokenizer.apply_chat_template(first, tokenize=False) and doc.startswith("<|im_start|>user\n")
    ids = dm.tokenizer(doc, add_special_tokens=False)["input_ids"]
    assert np.isin(ids, special).sum() == 2 * len(first)  # the template's tokens are parsed back to their ids
    batches = list(dm.train_dataloader())
    tok = torch.cat([b["tok"] for b in batches]).numpy()
    assert len(batches) > 3 and not np.isin(tok, special).any()
    drops = [r.dropped_norm for r in lm_rows(dm.lm, dm.tokenizer, dm.text, dm.config, dm.hooks,
                                              {dm.hook_point: float("inf")}, "train", drop_token_ids=special)]
    assert sum(drops) > 0  # special-token rows existed in the contexts and were dropped


@pytest.mark.parametrize("line, expect", [
    ('{"messages": [{"role": "user"}]}', "message 0 is"),
    ('{"messages": []}', "no 'messages' list"),
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
])
def test_malformed_line_names_file_and_line(chat_world, tmp_path, line, expect):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hello"}]})
    path.write_text("\n".join([good, good, line, good]) + "\n")
    with pytest.raises(ValueError) as err:
        chat_source(path, _dm(chat_world).tokenizer)
    msg = str(err.value)
    assert msg.startswith("data.source: ") and f"{path}:3:" in msg and expect in msg and '"messages"' in msg
    assert "\n" not in msg


def test_tokenizer_without_template_is_refused(chat_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_world / "lm")
    tok.chat_template = None
    with pytest.raises(ValueError, match="data.chat: the tokenizer .* has no chat template"):
        chat_source(chat_world / "chats.jsonl", tok)
