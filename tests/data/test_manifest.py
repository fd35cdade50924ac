"""The typed manifest: JSON round trip, manifests written by earlier versions, validation naming file and key."""

import json

import pytest
import torch

from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.data.shards import (
    FORMAT,
    Exclusions,
    LMInfo,
    Manifest,
    ShardError,
    ShardInfo,
    ShardWriter,
    SourceInfo,
    SplitInfo,
    read_manifest,
    write_manifest_atomic,
)


def _full() -> Manifest:
    return Manifest(
        d_in=4, dtype="bfloat16", block_tokens=8,
        splits={"train": SplitInfo([ShardInfo("train-000000.tar", 16, 2, "ab" * 32),
                                    ShardInfo("train-000001.tar", 5, 1, "cd" * 32)], contexts=3),
                "val": SplitInfo([], contexts=0)},
        tokens_per_shard=16, context_length=8, hook_point="blocks.1.hook_mlp_out",
        lm=LMInfo("some/model", None, None, "GPT2LMHeadModel", 3), tokenizer="GPT2TokenizerFast of some/model",
        source=SourceInfo("files", "corpus", "ef" * 32, 7),
        exclusions=Exclusions(True, 5.0, 12.5, dropped_norm=2, dropped_nonfinite=1), complete=False,
        config={"seed": 3, "total_tokens": 30}, created_by="lit-sae 0.1", resume={"train": {"done": False}},
    )


def test_round_trip_and_derived_counts(tmp_path):
    m = _full()
    assert m.tokens == 21 and m.splits["train"].tokens == 21 and m.split_tokens("test") == 0
    j = m.to_json()
    assert j["lm"]["name"] == "some/model" and "model" not in j and j["tokens"] == 21
    assert j["splits"]["train"]["tokens"] == 21 and j["splits"]["train"]["shards"][1]["blocks"] == 1
    assert Manifest.from_json(json.loads(json.dumps(j))) == m
    write_manifest_atomic(str(tmp_path), m)
    assert read_manifest(str(tmp_path)) == m and not (tmp_path / "manifest.json.tmp").exists()
    assert m["hook_point"] == "blocks.1.hook_mlp_out" and m.get("missing", 7) == 7  # read-only dict access


def test_manifest_of_an_earlier_version_reads_and_unknown_keys_survive(tmp_path):
    """Earlier versions named the language model "model" with "name_or_path"; keys unknown to this version stay."""
    old = {"format": FORMAT, "d_in": 8, "dtype": "float16", "block_tokens": 4, "tokens_per_shard": 8,
           "model": {"name_or_path": "smollm2-135m", "gguf_file": "x.gguf", "sha256": None,
                     "architecture": "LlamaForCausalLM", "n_layers": 30},
           "splits": {"train": {"shards": [{"name": "train-000000.tar", "tokens": 8}], "tokens": 8}},
           "tokens": 8, "future_field": {"a": 1}}
    with ShardWriter(str(tmp_path), "train", 8, "float16", 4, 8) as w:
        w.add(torch.randn(8, 8), torch.arange(8), torch.arange(8), torch.arange(8))
    write_manifest_atomic(str(tmp_path), old)  # a plain dict is written as given
    m = read_manifest(str(tmp_path))
    assert m.lm_name == "smollm2-135m" and m.lm.gguf_file == "x.gguf" and m.lm.n_layers == 30
    assert m.complete and m.exclusions is None and m.extra == {"future_field": {"a": 1}}
    assert m.to_json()["future_field"] == {"a": 1}
    dm = ActivationDataModule(str(tmp_path), batch_size_tokens=4, num_workers=0)
    assert dm.model_name == dm.lm_name == "smollm2-135m" and dm.manifest == m


@pytest.mark.parametrize("change,message", [
    (dict(format="other/1"), r"format is 'other/1', expected 'lit-sae-shards/1'"),
    (dict(d_in=None), r"missing keys \['d_in'\]"),
    (dict(d_in=0), r"d_in must be a positive integer, got 0"),
    (dict(block_tokens=True), r"block_tokens must be a positive integer, got True"),
    (dict(dtype="float32"), r"dtype 'float32' is not one of"),
    (dict(splits=[]), r"'splits' must be an object"),
    (dict(splits={"train": {"shards": [{"name": "a.tar"}]}}), r"splits.train.shards\[0\] needs a 'name' \(str\) "
                                                                r"and 'tokens' \(int\)"),
    (dict(splits={"train": {"shards": [{"name": "../a.tar", "tokens": 1}]}}), r"splits.train.shards\[0\] has an invalid name or token count"),
    (dict(lm="gpt2"), r"'lm' must be an object, got str"),
])
def test_validation_names_the_file_and_the_key(tmp_path, change, message):
    obj = _full().to_json()
    obj.update(change)
    obj = {k: v for k, v in obj.items() if v is not None}
    (tmp_path / "manifest.json").write_text(json.dumps(obj))
    with pytest.raises(ShardError, match=r"manifest.json: " + message):
        read_manifest(str(tmp_path))
