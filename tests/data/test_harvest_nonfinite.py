"""Bad numbers never pass for good ones in a harvest: rows that overflow float16 (a token whose embedding is 1e5)
are counted and left out of the norm median, every finite row is kept as with a clean model, and manifest.json is
strict JSON; a median that cannot be finite stops the harvest with a message naming the setting."""

import json
from collections import Counter

import pytest
import torch

from lit_sae.data.contexts import iter_contexts
from lit_sae.data.harvest import run_harvest
from lit_sae.data.text import open_source
from tests.support.tiny_lm import FILES, STDLIB, tiny_lm

ARGS = dict(hook_point="blocks.0.hook_resid_post", total_tokens=600, context_length=32, batch_size=16,
            block_tokens=256, tokens_per_shard=1024, val_fraction=0.1, test_fraction=0.3, progress=False,
            model_dtype="float16")


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """(texts, clean model, model with one first-batch token set to 1e5, model with every token set to 1e5)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("nonfinite")
    texts = root / "texts"
    texts.mkdir()
    corpus = [(STDLIB / f).read_text() for f in FILES]
    for f, t in zip(FILES, corpus):
        (texts / f"{f}.txt").write_text(t)
    tiny_lm(root / "clean", corpus)
    tok = AutoTokenizer.from_pretrained(root / "clean")
    contexts = [ids for _, ids in iter_contexts(tok, open_source(str(texts), shuffle_seed=0).documents(), 32, 64)]
    counts = Counter(t for ids in contexts for t in ids[1:])
    rare = min({t for ids in contexts[:16] for t in ids[1:]}, key=lambda t: (counts[t], t))
    out = [texts, root / "clean"]
    for name, rows in (("one_token", [rare]), ("all_tokens", slice(None))):
        model = AutoModelForCausalLM.from_pretrained(root / "clean")
        with torch.no_grad():
            model.transformer.wte.weight[rows] = 1e5  # finite in float32, inf in float16
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(root / name)
    return out


def _strict(path):
    def refuse(const):
        raise ValueError(f"{path}: {const} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_nonfinite_rows_are_left_out_of_the_norm_median(lms, tmp_path):
    texts, clean, one_token, _ = lms
    ref = run_harvest(out_dir=str(tmp_path / "clean"), model=str(clean), source=str(texts), **ARGS)
    bad = run_harvest(out_dir=str(tmp_path / "bad"), model=str(one_token), source=str(texts), **ARGS)
    ex = bad.exclusions
    assert ex.dropped_nonfinite > 0
    # The median over the remaining finite rows: within the clean median's spread, not NaN.
    assert ex.norm_median == pytest.approx(ref.exclusions.norm_median, rel=0.2)
    assert ex.dropped_norm == ref.exclusions.dropped_norm
    assert bad.tokens >= ref.tokens - ex.dropped_nonfinite
    assert _strict(tmp_path / "bad" / "manifest.json")["exclusions"]["norm_median"] == ex.norm_median


def test_a_median_that_cannot_be_finite_stops_the_harvest(lms, tmp_path):
    texts, _, _, all_tokens = lms
    with pytest.raises(FloatingPointError, match=r"norm_filter_multiple: the median activation norm .* nan .*"
                                                 r"model_dtype float32"):
        run_harvest(out_dir=str(tmp_path / "all"), model=str(all_tokens), source=str(texts), **ARGS)
