"""A harvest resumes only from the same inputs, identified by content (``lit_sae.data.identity``): replacing the
model folder's weights, the tokenizer or the text source's files between an interruption and the rerun refuses the
resume with a message naming the input (issue 25's case: a resume after the weights changed)."""

import json
import shutil

import pytest
import torch

from lit_sae.data import writer as W
from lit_sae.data.harvest import run_harvest
from lit_sae.data.harvest_state import HarvestConfigError
from lit_sae.data.identity import tokenizer_sha256, weights_sha256
from lit_sae.data.text import open_source
from tests.support.tiny_lm import FILES, STDLIB, tiny_lm

SETTINGS = dict(hook_point="blocks.0.hook_resid_post", total_tokens=3000, context_length=32, batch_size=16,
                block_tokens=128, tokens_per_shard=512, val_fraction=0.1, test_fraction=0.2, progress=False)


class Preempted(Exception):
    pass


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    (root / "texts").mkdir()
    corpus = [(STDLIB / f).read_text() for f in FILES[:4]]
    for f, t in zip(FILES, corpus):
        (root / "texts" / f"{f}.txt").write_text(t)
    tiny_lm(root / "lm", corpus)
    return root


def _interrupted(base, tmp_path, monkeypatch):
    """A copy of the inputs and a harvest of them stopped after its first train shard (a preemption)."""
    lm, texts, out = tmp_path / "lm", tmp_path / "texts", tmp_path / "shards"
    shutil.copytree(base / "lm", lm)
    shutil.copytree(base / "texts", texts)
    orig = W.ShardWriter._write_shard

    def preempt(self, arrays):
        if self.index >= 1:
            raise Preempted
        return orig(self, arrays)

    with monkeypatch.context() as m:
        m.setattr(W.ShardWriter, "_write_shard", preempt)
        with pytest.raises(Preempted):
            run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    inputs = json.loads((out / "manifest.json").read_text())["inputs"]
    assert all(len(inputs[k]) == 64 for k in ("weights_sha256", "tokenizer_sha256", "source_sha256"))
    return lm, texts, out


def _replace_weights(lm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm)
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(lm)  # same path, architecture and tokenizer; other weights


def test_resume_after_the_weights_changed_is_refused_naming_them(base, tmp_path, monkeypatch):
    lm, texts, out = _interrupted(base, tmp_path, monkeypatch)
    before = sorted(p.name for p in out.iterdir())
    old = json.loads((out / "manifest.json").read_text())["inputs"]["weights_sha256"]
    _replace_weights(lm)
    with pytest.raises(HarvestConfigError) as e:
        run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    msg = str(e.value)
    assert "model's weights" in msg and "tokenizer" not in msg and "text source" not in msg
    assert "manifest.json" in msg and "overwrite=true" in msg
    assert sorted(p.name for p in out.iterdir()) == before  # nothing deleted or added
    # overwrite=true starts over: the finished harvest holds only the new model's activations
    man = run_harvest(out_dir=str(out), model=str(lm), source=str(texts), overwrite=True, **SETTINGS)
    assert man.complete and man.inputs.weights_sha256 != old and man.splits["train"].shards[0].name == "train-000000.tar"


def test_resume_after_the_text_or_tokenizer_changed_is_refused_naming_it(base, tmp_path, monkeypatch):
    lm, texts, out = _interrupted(base, tmp_path, monkeypatch)
    first = sorted(texts.iterdir())[0]
    first.write_text(first.read_text() + "\n# one more line\n")
    with pytest.raises(HarvestConfigError, match=r"text source's files") as e:
        run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    assert "weights" not in str(e.value)
    shutil.copy(base / "texts" / first.name, first)  # restored: the same content resumes...
    cfg = json.loads((lm / "tokenizer.json").read_text())
    cfg["model"]["merges"] = cfg["model"]["merges"][:-1]  # ...but not with another tokenizer (one merge fewer)
    (lm / "tokenizer.json").write_text(json.dumps(cfg))
    with pytest.raises(HarvestConfigError, match=r"the tokenizer \(sha256") as e:
        run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    shutil.copy(base / "lm" / "tokenizer.json", lm / "tokenizer.json")
    man = run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)  # all restored: resumes
    assert man.complete


def test_identities_follow_content_not_names(base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = AutoModelForCausalLM.from_pretrained(base / "lm")
    b = AutoModelForCausalLM.from_pretrained(base / "lm")
    assert weights_sha256(a) == weights_sha256(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert weights_sha256(a) != weights_sha256(b)
    tok = AutoTokenizer.from_pretrained(base / "lm")
    tok.save_pretrained(tmp_path / "copy")
    assert tokenizer_sha256(AutoTokenizer.from_pretrained(tmp_path / "copy")) == tokenizer_sha256(tok)
    shutil.copytree(base / "texts", tmp_path / "texts")
    fp = open_source(str(tmp_path / "texts")).fingerprint()
    assert fp == open_source(str(base / "texts")).fingerprint()  # another folder, the same files
    (tmp_path / "texts" / "extra.txt").write_text("a new document")
    assert open_source(str(tmp_path / "texts")).fingerprint() != fp
