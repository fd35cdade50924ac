"""A context is shown as its tokenizer decodes it: with a byte-level BPE whose vocabulary has no merge for emoji or
CJK bytes, each of those characters is split over several tokens, and decoding each token alone gives U+FFFD;
``token_pieces`` gives pieces that join to ``tokenizer.decode(ids)`` and hold no U+FFFD where it holds none. The
feature browser (data files and the page in headless chromium) shows those pieces."""

import json
import shutil
import subprocess

import pytest
import torch

from lit_sae.data.detok import decode_runs, token_pieces

TEXT = "The cat 🐱 sat on the mat. 猫が座った。Ünïcödé café 🚀🚀 done."
ASCII = ["the cat sat on the mat and the dog sat on the log " * 20, "done with it, the end " * 20]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A GPT-2-style byte-level BPE trained on ASCII only (saved and reloaded as a transformers tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(ASCII, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_pieces_join_to_the_decoding_without_replacement_chars(tokenizer):
    ids = tokenizer.encode(TEXT)
    full = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    assert full == TEXT
    alone = [tokenizer.decode([i]) for i in ids]
    assert sum("\ufffd" in s for s in alone) >= 10  # the bug this guards against: each byte token alone
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == full
    assert not any("\ufffd" in p for p in pieces)
    for ch in "🐱猫座Ü🚀":  # each character is whole in exactly one token's piece
        assert any(ch in p for p in pieces)
    cat = next(j for j, p in enumerate(pieces) if "🐱" in p)
    assert pieces[cat - 1] == "" or pieces[cat] == " 🐱"  # earlier bytes of the emoji wait for the token finishing it


def test_a_context_cut_inside_a_character_keeps_the_tokenizers_decoding(tokenizer):
    ids = tokenizer.encode("ok 🐱")[:-1]  # ends inside the emoji's bytes
    full = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    assert full.endswith("\ufffd") and "".join(token_pieces(tokenizer, ids)) == full


def test_patterns_decode_runs_together(tokenizer):
    ids = tokenizer.encode("猫🚀")
    assert decode_runs(tokenizer, [*ids, None, *tokenizer.encode("the")]) == ["猫🚀", None, "the"]


def _stats(L, n_contexts):
    from lit_sae.features.collect import FeatureStats

    z = torch.zeros
    return FeatureStats(n_tokens=10, count=torch.tensor([3] * L), sum=torch.ones(L, dtype=torch.float64),
                        max=torch.ones(L), hist=z(L, 4, dtype=torch.long), top_value=torch.ones(L, n_contexts),
                        top_ctx=torch.arange(n_contexts).repeat(L, 1), top_pos=z(L, n_contexts, dtype=torch.long),
                        band_value=z(L, 1, 1), band_ctx=-torch.ones(L, 1, 1, dtype=torch.long),
                        band_pos=z(L, 1, 1, dtype=torch.long), band_count=z(L, 1, dtype=torch.long),
                        top_window=torch.ones(L, n_contexts, 3), band_window=z(L, 1, 1, 3), window=(1, 1))


def test_browser_shows_each_context_as_decoded(tokenizer, tmp_path):
    from lit_sae.features.write import latent_records, write_browser

    contexts = [tokenizer.encode("a 🐱 b"), tokenizer.encode("猫が cat")]
    width = max(map(len, contexts))
    contexts = [row + tokenizer.encode(" the") * (width - len(row)) for row in contexts]
    stats = _stats(1, len(contexts))
    # the latent's max sits on the token that finishes the emoji / the first CJK character
    for c, ch in enumerate(("🐱", "猫")):
        stats.top_pos[0, c] = next(j for j, p in enumerate(token_pieces(tokenizer, contexts[c])) if ch in p)
    top_ids = torch.tensor([contexts[1][:2]])
    records = latent_records(stats, logits=(torch.ones(1, 2), top_ids, -torch.ones(1, 2), top_ids),
                             neighbours=(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long)))
    vocab = {t: tokenizer.decode([t]) for row in contexts for t in row}
    page = write_browser(tmp_path / "features", records, contexts, vocab, stats, {"source": {}, "window": [1, 1]},
                         tokenizer=tokenizer)
    data = page.parent / "data"
    pieces = json.loads(__import__("gzip").open(data / "pieces.json.gz").read())
    for row, over in zip(contexts, pieces):
        shown = "".join(over.get(str(j), vocab[t]) for j, t in enumerate(row))
        assert shown == tokenizer.decode(row, clean_up_tokenization_spaces=False) and "\ufffd" not in shown
    summary = json.loads((data / "summary.json").read_text())
    assert {t.strip() for t in summary["latents"]["top_tokens"][0]} == {"🐱", "猫"}
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed: the page itself is not rendered (the data files were checked)")
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
                          "--virtual-time-budget=10000", "--disable-background-networking", "--dump-dom",
                          f"{page.as_uri()}#latent-0"], capture_output=True, text=True, timeout=120).stdout
    top = dom.split('id="top"', 1)[1]
    assert "🐱" in top and "猫" in top and "\ufffd" not in top and "&#xfffd;" not in top.lower()
