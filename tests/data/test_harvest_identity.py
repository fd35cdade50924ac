"""A harvest resumes only from the same inputs, identified by content (``lit_sae.data.identity``): replacing the
model folder's weights, the tokenizer or the text source's files between an interruption and the rerun sets the old
files aside (a sibling ``.superseded-*`` folder, named in a warning) and starts over, so every row of the finished
folder comes from the inputs of the rerun (issue 25's case: a resume after the weights changed)."""

import json
import shutil

import pytest
import torch

from lit_sae.data import writer as W
from lit_sae.data.harvest import run_harvest
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


def _rows(out):
    """Every stored row of every split: {split: {acts, tok, ctx, pos}} as numpy arrays."""
    import numpy as np

    from lit_sae.data.manifest import read_manifest
    from lit_sae.data.reader import ShardRef, read_shard

    m = read_manifest(str(out))
    rows = {}
    for split in ("train", "val", "test"):
        pieces = [p for s in m.splits[split].shards for p in read_shard(ShardRef(str(out / s.name), s.name, s.tokens), m)]
        rows[split] = {k: np.concatenate([np.array(p[k]) for p in pieces]) for k in ("acts", "tok", "ctx", "pos")}
    return rows


def test_resume_after_the_weights_changed_sets_the_old_harvest_aside(base, tmp_path, monkeypatch, caplog):
    lm, texts, out = _interrupted(base, tmp_path, monkeypatch)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    old = json.loads((out / "manifest.json").read_text())["inputs"]["weights_sha256"]
    _replace_weights(lm)
    with caplog.at_level("WARNING", logger="lit_sae"):
        man = run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    aside = sorted(tmp_path.glob("shards.superseded-*"))
    assert len(aside) == 1
    msg = caplog.text
    assert "model's weights" in msg and "tokenizer (" not in msg and str(aside[0]) in msg
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == before  # the old files, unchanged
    assert man.complete and man.inputs.weights_sha256 != old
    assert man.splits["train"].shards[0].name == "train-000000.tar"
    # every row of the finished folder is the new model's: equal to a harvest of the new weights from scratch
    # (the same kernels on the same inputs in this process, so bit for bit)
    fresh = run_harvest(out_dir=str(tmp_path / "fresh"), model=str(lm), source=str(texts), **SETTINGS)
    assert fresh.inputs == man.inputs
    got, want = _rows(out), _rows(tmp_path / "fresh")
    for split in want:
        for k in want[split]:
            assert (got[split][k] == want[split][k]).all(), (split, k)


def test_resume_after_the_text_or_tokenizer_changed_starts_over_and_the_same_inputs_resume(base, tmp_path,
                                                                                           monkeypatch, caplog):
    lm, texts, out = _interrupted(base, tmp_path, monkeypatch)
    first = sorted(texts.iterdir())[0]
    saved = first.read_text()
    first.write_text(saved + "\n# one more line\n")
    with caplog.at_level("WARNING", logger="lit_sae"):
        run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    assert "the text source's files" in caplog.text and "weights" not in caplog.text
    assert len(list(tmp_path.glob("shards.superseded-*"))) == 1
    # unchanged inputs: a complete harvest is kept as it is, nothing set aside
    man = run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    assert man.complete and len(list(tmp_path.glob("shards.superseded-*"))) == 1


def test_a_complete_harvest_of_other_inputs_is_not_served_as_this_one(base, tmp_path):
    """huggingface/datasets #2956: a finished harvest whose model changed behind its path is redone, not returned."""
    lm, texts, out = tmp_path / "lm", base / "texts", tmp_path / "shards"
    shutil.copytree(base / "lm", lm)
    first = run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    again = run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    assert again.inputs == first.inputs and not list(tmp_path.glob("shards.superseded-*"))  # same inputs: kept
    _replace_weights(lm)
    redone = run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    assert redone.complete and redone.inputs.weights_sha256 != first.inputs.weights_sha256
    assert len(list(tmp_path.glob("shards.superseded-*"))) == 1


def test_overwrite_deletes_a_harvest_of_other_inputs(base, tmp_path, monkeypatch):
    lm, texts, out = _interrupted(base, tmp_path, monkeypatch)
    cfg = json.loads((lm / "tokenizer.json").read_text())
    cfg["model"]["merges"] = cfg["model"]["merges"][:-1]  # another tokenizer (one merge fewer)
    (lm / "tokenizer.json").write_text(json.dumps(cfg))
    man = run_harvest(out_dir=str(out), model=str(lm), source=str(texts), overwrite=True, **SETTINGS)
    assert man.complete and not list(tmp_path.glob("shards.superseded-*"))


def test_an_unchanged_interrupted_harvest_resumes_in_place(base, tmp_path, monkeypatch):
    lm, texts, out = _interrupted(base, tmp_path, monkeypatch)
    first = (out / "train-000000.tar").read_bytes()
    man = run_harvest(out_dir=str(out), model=str(lm), source=str(texts), **SETTINGS)
    assert man.complete and (out / "train-000000.tar").read_bytes() == first
    assert not list(tmp_path.glob("shards.superseded-*"))


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
