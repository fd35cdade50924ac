"""Several hook points from one LM pass: a multi-hook harvest (one folder per hook, one top manifest) and the
DataModule reading them row-aligned (tiny random GPT-2, byte tokenizer; a few seconds each)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_sae.data import harvest as harvest_mod
from lit_sae.data.contexts import split_contexts
from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.data.harvest import run_harvest
from lit_sae.data.hook_sets import HookSets, folder_name
from lit_sae.data.manifest import read_manifest
from lit_sae.data.shard_format import ShardError
from lit_sae.data.text import open_source
from tests.data.test_harvest import _args, _read_split, _save_tiny_lm, _shard_bytes, write_corpus

REPO = Path(__file__).resolve().parents[2]
HOOKS = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", "blocks.0.hook_resid_post"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return _save_tiny_lm("gpt2", tmp_path_factory.mktemp("gpt2"))


def _multi(model, corpus, out, **kw):
    args = _args(model, corpus, out, **kw)
    args.pop("hook_point")
    return {**args, "hook_points": HOOKS, **kw}


@pytest.fixture(scope="module")
def multi(tiny_gpt2, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("multi")
    sets = run_harvest(**_multi(tiny_gpt2, corpus, out, norm_filter_multiple=1.1))
    return out, sets


def _manifests(out):
    return {h: read_manifest(str(out / folder_name(h))) for h in HOOKS}


def test_one_folder_per_hook_with_the_same_rows(multi, tiny_gpt2, corpus, tmp_path):
    out, sets = multi
    assert isinstance(sets, HookSets) and sets.complete and sets.hook_points == HOOKS
    top = json.loads((out / "manifest.json").read_text())
    assert top["format"] == "lit-sae-hook-sets/1" and top["folders"][HOOKS[0]] == "blocks.1.ln2.hook_normalized"
    manifests = _manifests(out)
    for h, m in manifests.items():
        assert m.hook_point == h and m.complete and m.config["hook_points"] == HOOKS
        assert m.exclusions.norm_median > 0  # each hook has its own median...
    ex = [m.exclusions for m in manifests.values()]
    assert len({(e.dropped_norm, e.dropped_nonfinite) for e in ex}) == 1 and ex[0].dropped_norm > 0  # ...one mask
    names = {h: [(s.name, s.tokens) for sp in m.splits.values() for s in sp.shards] for h, m in manifests.items()}
    assert names[HOOKS[0]] == names[HOOKS[1]] == names[HOOKS[2]]
    rows = {h: _read_split(out / folder_name(h), m.to_json(), "train") for h, m in manifests.items()}
    for h in HOOKS[1:]:
        for k in ("tok", "ctx", "pos"):
            np.testing.assert_array_equal(rows[h][k], rows[HOOKS[0]][k])
    # Without a filter, each folder is byte-identical to a one-hook harvest of its hook point.
    plain = run_harvest(**_multi(tiny_gpt2, corpus, tmp_path / "m"))
    single = run_harvest(**_args(tiny_gpt2, corpus, tmp_path / "s", hook_point=HOOKS[1]))
    assert plain.complete and single.hook_point == HOOKS[1]
    assert _shard_bytes(tmp_path / "m" / folder_name(HOOKS[1])) == _shard_bytes(tmp_path / "s")


def test_rows_hold_each_hook_of_the_same_token(multi, tiny_gpt2):
    """A stored row of every hook equals a direct forward of its context (fp16 storage: relative error <= 2^-11)."""
    from lit_sae.data.lm import load_lm, truncated_forward

    out, _ = multi
    manifests = _manifests(out)
    lm, tokenizer = load_lm(tiny_gpt2)
    cfg = manifests[HOOKS[0]].config
    text = open_source(cfg["source"], shuffle_seed=cfg["seed"] if cfg["shuffle_documents"] else None)
    (c, ids), = split_contexts(tokenizer, text.documents(), "val", 1, context_length=64, n_contexts=None,
                               max_contexts_per_document=None, seed=cfg["seed"], val_fraction=0.1, test_fraction=0.1)
    rows = {h: _read_split(out / folder_name(h), m.to_json(), "val") for h, m in manifests.items()}
    sel = np.flatnonzero(rows[HOOKS[0]]["ctx"] == c)
    pos = rows[HOOKS[0]]["pos"][sel]
    assert len(sel) > 10 and (rows[HOOKS[0]]["tok"][sel] == np.asarray(ids)[pos]).all()
    with torch.no_grad():
        for h in HOOKS:
            a = truncated_forward(lm, torch.as_tensor(ids)[None], h)[0, pos].numpy()
            np.testing.assert_allclose(rows[h]["acts"][sel], a, rtol=1e-3, atol=1e-3 * float(np.abs(a).max()))


def test_interrupted_between_two_folders_resumes_aligned(multi, tiny_gpt2, corpus, tmp_path, monkeypatch):
    """A crash after one folder recorded a shard and before the next did: the rerun rolls back and completes
    byte-identical to the uninterrupted harvest."""
    ref, _ = multi
    out = tmp_path / "c"
    second = str(out / folder_name(HOOKS[1]))
    real = harvest_mod.write_manifest_atomic
    calls = {"n": 0}

    def crashing(folder, manifest):
        if folder == second and getattr(manifest, "splits", None) and manifest.splits["train"].shards:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("injected crash")
        return real(folder, manifest)

    monkeypatch.setattr(harvest_mod, "write_manifest_atomic", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_harvest(**_multi(tiny_gpt2, corpus, out, norm_filter_multiple=1.1))
    counts = [len(m.splits["train"].shards) for m in _manifests(out).values()]
    assert counts[0] == counts[1] + 1  # the folders disagree by one shard
    monkeypatch.setattr(harvest_mod, "write_manifest_atomic", real)
    sets = run_harvest(**_multi(tiny_gpt2, corpus, out, norm_filter_multiple=1.1))
    assert sets.complete
    for h in HOOKS:
        assert _shard_bytes(out / folder_name(h)) == _shard_bytes(ref / folder_name(h))
        a, b = read_manifest(str(out / folder_name(h))), read_manifest(str(ref / folder_name(h)))
        assert a.splits == b.splits and a.exclusions == b.exclusions


def test_datamodule_reads_hooks_row_aligned(multi):
    out, _ = multi
    dm = ActivationDataModule(str(out), batch_size_tokens=128, shuffle_buffer_tokens=512, num_workers=0,
                              hook_points=HOOKS[:1], target_hook_point=HOOKS[1])
    assert dm.hook_point == HOOKS[0] and dm.d_in == 32 and dm.d_target == 32
    singles = {h: ActivationDataModule(str(out / folder_name(h)), batch_size_tokens=128, shuffle_buffer_tokens=512,
                                       num_workers=0) for h in HOOKS[:2]}
    zipped = list(dm.train_dataloader())
    alone = {h: list(d.train_dataloader()) for h, d in singles.items()}
    assert len(zipped) == len(alone[HOOKS[0]]) > 1
    for i, b in enumerate(zipped):
        assert set(b) == {"acts", "target", "tok", "ctx", "pos", f"acts@{HOOKS[0]}", f"acts@{HOOKS[1]}"}
        assert torch.equal(b["acts"], alone[HOOKS[0]][i]["acts"]) and b["acts"] is b[f"acts@{HOOKS[0]}"]
        assert torch.equal(b["target"], alone[HOOKS[1]][i]["acts"])
        assert torch.equal(b["ctx"], alone[HOOKS[1]][i]["ctx"]) and torch.equal(b["pos"], alone[HOOKS[1]][i]["pos"])
    val = list(dm.val_dataloader())
    assert sum(len(b["target"]) for b in val) == dm._hooks[HOOKS[1]][0].split_tokens("val")
    torch.testing.assert_close(dm.sample_activations(64, HOOKS[1]), singles[HOOKS[1]].sample_activations(64))


def test_datamodule_with_workers_reads_the_same_batches(multi):
    out, _ = multi
    kw = dict(batch_size_tokens=128, shuffle_buffer_tokens=512, hook_points=HOOKS, target_hook_point=HOOKS[1])
    a = list(ActivationDataModule(str(out), num_workers=0, **kw).train_dataloader())
    b = list(ActivationDataModule(str(out), num_workers=1, **kw).train_dataloader())
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_bad_hook_requests_name_the_key(multi):
    out, _ = multi
    with pytest.raises(ValueError, match=r"data.hook_points: 'blocks.2.hook_mlp_out' is not in"):
        ActivationDataModule(str(out), hook_points=["blocks.2.hook_mlp_out"])
    with pytest.raises(ValueError, match="data.target_hook_point: .* holds one hook point"):
        ActivationDataModule(str(out / folder_name(HOOKS[0])), target_hook_point=HOOKS[1])
    with pytest.raises(ShardError, match="holds 3 hook points .* subfolder"):
        read_manifest(str(out))  # a tool expecting one folder says where the folders are


def test_cli_unknown_hook_point_exits_2_and_writes_nothing(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "never"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lit_sae.cli.main", "harvest", "--out_dir", str(out), "--model",
                           tiny_gpt2, "--source", corpus, "--hook_points",
                           "[blocks.0.hook_mlp_out, blocks.10.hook_resid_pre]", "--progress", "false"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "blocks.10.hook_resid_pre" in err[0] and "no layer 10" in err[0]
    assert "did you mean" not in err[0] and not out.exists()


def test_cli_harvest_prints_no_object_dump(tiny_gpt2, corpus, tmp_path, capsys):
    """stdout of a tool is its product or nothing: a harvest is reported by its log line, not by a Manifest repr."""
    from lit_sae.cli.main import main

    main(["harvest", "--out_dir", str(tmp_path / "h"), "--model", tiny_gpt2, "--source", corpus, "--hook_point",
          HOOKS[0], "--total_tokens", "600", "--context_length", "16", "--block_tokens", "64",
          "--tokens_per_shard", "128", "--progress", "false"])
    assert (tmp_path / "h" / "manifest.json").exists()
    assert "Manifest(" not in capsys.readouterr().out
