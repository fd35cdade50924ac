"""One context builder: harvest and evaluation cut identical windows (special tokens, position 0).

The tokenizer here adds a BOS token by default (like Llama's), so a builder that forgot ``add_special_tokens=False``
would shift every window by one token; the harvest stores (token id, context id, position) for each row, and the
evaluation's held-out contexts must hold exactly those token ids at those positions.
"""

import numpy as np
import pytest
import torch

from lit_sae.data.contexts import iter_contexts, tokenize
from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.data.harvest import run_harvest
from lit_sae.data.shards import read_manifest
from lit_sae.eval.downstream import make_contexts
from lit_sae.eval.report import held_out_contexts, settings_from_manifest

BOS = 0


@pytest.fixture(scope="module")
def model_with_bos(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("bos-lm")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=260, n_positions=64)).save_pretrained(
        folder)
    vocab = {"<s>": BOS, **{ch: i + 1 for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    words = ["def", "return", "lambda", "x", "(", ")", ":", "\n", "import", "sys"]
    for i in range(10):
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(words, size=int(rng.integers(30, 200)))))
    return str(folder)


def test_the_tokenizer_adds_bos_by_default_but_contexts_do_not(model_with_bos):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_with_bos)
    assert tok("abc")["input_ids"][0] == BOS  # the control: the default call would put BOS at position 0
    assert tokenize(tok, "abc") == tok("abc")["input_ids"][1:] and BOS not in tokenize(tok, "abc")
    docs = ["a" * 10, "bcd" * 7, "e" * 3]
    ctx = list(iter_contexts(tok, docs, 4))
    # 10 -> 2 windows, 21 -> 5 windows, 3 -> none; numbered in stream order; windows never cross documents.
    assert [c for c, _ in ctx] == list(range(7))
    assert [ids for _, ids in ctx] == [tokenize(tok, "aaaa")] * 2 + [tokenize(tok, s) for s in
                                                                     ("bcdb", "cdbc", "dbcd", "bcdb", "cdbc")]
    assert list(iter_contexts(tok, docs, 4, n_contexts=3, max_contexts_per_document=1))[-1][0] == 1
    assert make_contexts(tok, docs, 4).tolist() == [ids for _, ids in ctx]


def test_harvest_and_evaluation_windows_are_identical(model_with_bos, corpus, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "shards"
    run_harvest(out_dir=str(out), model=model_with_bos, hook_point="blocks.1.hook_resid_post", source=corpus,
                total_tokens=1500, context_length=16, batch_size=8, block_tokens=64, tokens_per_shard=256,
                norm_filter_multiple=None, val_fraction=0.2, test_fraction=0.3, seed=5, progress=False)
    manifest = read_manifest(str(out))
    settings = settings_from_manifest(manifest)
    assert settings["first_position"] == 1 and settings["context_length"] == 16
    tok = AutoTokenizer.from_pretrained(model_with_bos)
    n_test = manifest.splits["test"].contexts
    assert n_test > 10
    held = held_out_contexts(settings, tok, n_test)  # what the evaluation suite and the feature browser use
    assert held.shape == (n_test, 16)
    assert not (held[:, 0] == BOS).any()  # no BOS at position 0: the document's own first token
    # Every stored test row (token, context, position) is the held-out window's token at that position.
    dm = ActivationDataModule(str(out), batch_size_tokens=100, num_workers=0)
    rows = [b for b in torch.utils.data.DataLoader(dm.eval_dataset("test", rank=0, world_size=1), batch_size=None)]
    tok_ids, ctx, pos = (torch.cat([b[k] for b in rows]) for k in ("tok", "ctx", "pos"))
    order = {c: i for i, c in enumerate(sorted(set(ctx.tolist())))}  # test contexts in stream order
    assert len(order) == n_test and int(pos.min()) == settings["first_position"] and int(pos.max()) == 15
    assert len(tok_ids) == n_test * 15  # every position but 0 of every test context
    want = held[[order[c] for c in ctx.tolist()], pos]
    assert torch.equal(want, tok_ids.long())
