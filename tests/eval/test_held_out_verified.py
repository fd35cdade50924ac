"""Every consumer of held-out text (evaluation report, probes, the feature browser's train and test contexts) rebuilds
it from the manifest's text source only after checking it is what the harvest read (``lit_sae.data.identity``);
after an edit of the source, or with another tokenizer, each refuses with a message naming the manifest."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from lit_sae.data.manifest import read_manifest
from lit_sae.eval.report import held_out_contexts, probe_documents, settings_from_manifest
from lit_sae.features.run import _train_contexts
from tests.support.tiny_lm import harvest_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return harvest_tiny(tmp_path_factory.mktemp("held_out"))


def _consumers(root, tokenizer):
    where = str(root / "shards" / "manifest.json")
    s = settings_from_manifest(read_manifest(str(root / "shards")), where)
    return {"held_out_contexts": lambda: held_out_contexts(s, tokenizer, 4),
            "probe_documents": lambda: probe_documents(s, tokenizer, 100),
            "features train contexts": lambda: _train_contexts(s, tokenizer, 100)}


def test_unchanged_source_rebuilds_the_harvested_test_contexts(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "lm")
    for name, call in _consumers(tiny, tok).items():
        assert len(call()) > 0, name


@pytest.mark.parametrize("edit", ["append", "new_file", "tokenizer"])
def test_changed_source_or_tokenizer_is_refused_by_every_consumer(tiny, tmp_path, edit):
    root = tmp_path / "copy"
    shutil.copytree(tiny, root)
    man = json.loads((root / "shards" / "manifest.json").read_text())
    man["config"]["source"] = str(root / "texts")  # the copy's own text folder
    (root / "shards" / "manifest.json").write_text(json.dumps(man))
    tok = AutoTokenizer.from_pretrained(root / "lm")
    if edit == "append":  # an edit of one file: documents shift between splits
        first = sorted((root / "texts").iterdir())[0]
        first.write_text("# an edit at the top\n" + first.read_text())
        expect = "text source"
    elif edit == "new_file":
        (root / "texts" / "0_new.txt").write_text("x = 1\n" * 400)
        expect = "text source"
    else:
        tok.add_tokens(["zzz_new_token"])
        expect = "the tokenizer"
    for name, call in _consumers(root, tok).items():
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert expect in msg and "manifest.json" in msg and "harvest again" in msg, (name, msg)


def test_a_manifest_without_a_source_hash_is_refused(tiny, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny / "shards", root)
    man = json.loads((root / "manifest.json").read_text())
    man.pop("inputs")
    man["source"]["sha256"] = None
    (root / "manifest.json").write_text(json.dumps(man))
    s = settings_from_manifest(read_manifest(str(root)), "m.json")
    with pytest.raises(ValueError, match="records no hash of the text source"):
        held_out_contexts(s, AutoTokenizer.from_pretrained(tiny / "lm"), 4)
