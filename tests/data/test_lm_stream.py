"""LMStreamDataModule on a tiny random GPT-2 (byte tokenizer): the streamed batches equal the batches of a harvest of
the same tokens; `lit-sae fit` on the stream trains the same SAE as on the shards; kill -9 and --ckpt_path last
continue exactly; bad input fails in one line with nothing written."""

import textwrap
from pathlib import Path

import pytest
import torch

from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.data.harvest import run_harvest
from lit_sae.data.lm_stream import LMStreamDataModule
from tests.data.test_harvest import _save_tiny_lm, write_corpus
from tests.support.faults import LossRecorder, finish, fit_subprocess, kill_when, read_losses  # noqa: F401

B = 128


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    (root / "corpus").mkdir()
    return {"root": root, "corpus": write_corpus(root / "corpus"), "lm": _save_tiny_lm("gpt2", root / "lm")}


def _settings(world, **kw):
    return {"model": world["lm"], "hook_point": "blocks.1.hook_resid_post", "source": world["corpus"],
            "total_tokens": 6300, "context_length": 64, "batch_size": 8, "norm_filter_multiple": 1.5,
            "val_fraction": 0.1, "test_fraction": 0.1, "seed": 3, **kw}


@pytest.fixture(scope="module")
def shards(world):
    """A harvest of the stream's tokens whose train split is one shard (so shard order cannot differ)."""
    out = world["root"] / "shards"
    run_harvest(out_dir=str(out), block_tokens=256, tokens_per_shard=1 << 20, progress=False, **_settings(world))
    return out


@pytest.mark.parametrize("mix", [0, 1024])
def test_stream_batches_equal_harvest_batches(world, shards, mix):
    dm = ActivationDataModule(str(shards), batch_size_tokens=B, shuffle_buffer_tokens=mix, shuffle=mix > 0,
                              num_workers=0, seed=3)
    st = LMStreamDataModule(batch_size_tokens=B, shuffle_buffer_tokens=mix, **_settings(world))
    assert st.d_in == dm.d_in and st.hook_point == dm.hook_point
    a, b = list(dm.train_dataloader()), list(st.train_dataloader())
    assert len(a) == len(b) == dm.manifest.split_tokens("train") // B
    for x, y in zip(a, b):
        assert set(y) == set(x) | {"stream_pos"}
        assert all(torch.equal(x[k], y[k]) for k in x)  # same rows, same float16 bits, same order
    assert int(b[-1]["stream_pos"][-1]) == 1 and not any(int(y["stream_pos"][-1]) for y in b[:-1])
    va, vb = list(dm.val_dataloader()), list(st.val_dataloader())
    assert len(va) == len(vb) and all(torch.equal(x["acts"], y["acts"]) for x, y in zip(va, vb))
    assert torch.equal(dm.sample_activations(300), st.sample_activations(300))


def test_ranks_stream_disjoint_contexts(world):
    """Under DDP each rank runs the LM on its own forwards: no context twice, none lost (before the tail rule)."""
    st = LMStreamDataModule(batch_size_tokens=B, shuffle_buffer_tokens=512, **_settings(world, norm_filter_multiple=None))
    ctx = {r: torch.cat([b["ctx"] for b in st.dataset("val", rank=r, world_size=2)]).unique() for r in (0, 1)}
    alone = torch.cat([b["ctx"] for b in st.dataset("val", rank=0, world_size=1)]).unique()
    assert len(ctx[0]) and len(ctx[1]) and not set(ctx[0].tolist()) & set(ctx[1].tolist())
    assert sorted(ctx[0].tolist() + ctx[1].tolist()) == alone.tolist()
    train = [torch.cat([b["ctx"] for b in st.dataset("train", rank=r, world_size=2)]).unique() for r in (0, 1)]
    assert not set(train[0].tolist()) & set(train[1].tolist())


def test_resume_position_continues_the_same_batches(world):
    """In-process: the position after batch c, loaded into a fresh DataModule, yields batches c+1.. exactly."""
    dm = LMStreamDataModule(batch_size_tokens=B, shuffle_buffer_tokens=640, **_settings(world))  # 640: not k x B
    full = list(dm.train_dataloader())
    for c in (0, 9, len(full) - 2):
        dm.on_before_batch_transfer(dict(full[c]), 0)
        state = dm.state_dict()
        dm.load_state_dict(state)
        rest = list(dm.train_dataloader())
        assert len(rest) == len(full) - c - 1
        assert all(torch.equal(x["acts"], y["acts"]) and torch.equal(x["ctx"], y["ctx"])
                   for x, y in zip(rest, full[c + 1:]))
    dm.on_before_batch_transfer(dict(full[-1]), 0)  # the epoch's last batch: saved as the next epoch's start
    assert dm.state_dict()["position"][:2] == [1, 0]


def test_bad_input_names_the_key(world, tmp_path):
    with pytest.raises(ValueError, match=r"data.hook_point: unknown hook point 'blocks.10.hook_resid_pre'.*no layer 10"):
        LMStreamDataModule(**_settings(world, hook_point="blocks.10.hook_resid_pre"))
    with pytest.raises(ValueError, match=r"data.total_tokens: text source .* holds \d+ tokens .* at most \d+"):
        LMStreamDataModule(**_settings(world, total_tokens=10**7))
    with pytest.raises(ValueError, match="data.num_workers"):
        LMStreamDataModule(num_workers=2, **_settings(world))
    with pytest.raises(ValueError, match="data: hook_point .* and hook_points .* both set"):
        LMStreamDataModule(**_settings(world, hook_points=["blocks.0.hook_mlp_out"]))


def _config(path: Path, run: Path, data: str, losses: Path, max_steps: int = 30) -> Path:
    path.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          max_steps: {max_steps}
          default_root_dir: {run}
          logger: false
          enable_progress_bar: false
          enable_model_summary: false
          deterministic: true
          val_check_interval: 10
          check_val_every_n_epoch: null
          num_sanity_val_steps: 0
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args:
                dirpath: {run}/checkpoints
                save_last: true
                every_n_train_steps: 4
                save_top_k: 0
            - class_path: tests.support.faults.LossRecorder
              init_args:
                path: {losses}
        model:
          n_latents: 64
          k: 4
          lr: 0.003
          k_aux: 8
          init_tokens: 1024
          dead_after_tokens: 2048
          export_dir: none
        data:
        """) + textwrap.indent(textwrap.dedent(data), "  "))
    return path


def _stream_data(world, **kw) -> str:
    args = {**_settings(world), "batch_size_tokens": B, "shuffle_buffer_tokens": 1024, "val_tokens": 256, **kw}
    lines = "".join(f"    {k}: {'null' if v is None else v}\n" for k, v in args.items())
    return f"class_path: lit_sae.data.lm_stream.LMStreamDataModule\ninit_args:\n{lines}"


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_fit_on_stream_equals_fit_on_shards(world, shards, tmp_path):
    """THE test of one product: `lit-sae fit` on the stream and on a harvest of the same tokens, read in the same
    order (one train shard, same seed and mixing window), train the same SAE: same batches (hashes of every step's
    token ids) and the same weights. Both runs do the same float32 operations on the same inputs in one process
    each, so the weights agree to rounding; the tolerance (1e-5 relative) only allows for that."""
    shard_data = (f"class_path: lit_sae.data.datamodule.ActivationDataModule\ninit_args:\n  path: {shards}\n"
                  f"  batch_size_tokens: {B}\n  shuffle_buffer_tokens: 1024\n  num_workers: 0\n  seed: 3\n"
                  "  val_tokens: 256\n")
    runs = {}
    for name, data in (("shards", shard_data), ("stream", _stream_data(world))):
        cfg = _config(tmp_path / f"{name}.yaml", tmp_path / name, data, tmp_path / f"{name}.tsv", max_steps=50)
        code, out = finish(fit_subprocess(cfg))
        assert code == 0, out[-2000:]
        runs[name] = read_losses(tmp_path / f"{name}.tsv")
    assert len(runs["stream"]) == 50 and [v[1] for v in runs["stream"].values()] == [v[1] for v in
                                                                                     runs["shards"].values()]
    a, b = _state(tmp_path / "shards"), _state(tmp_path / "stream")
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6 * float(a[k].abs().max()) + 1e-12)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_kill_then_resume_continues_bit_exactly(world, tmp_path):
    """kill -9 a streamed fit mid-epoch, --ckpt_path last: the same batches and losses as an uninterrupted run."""
    data = _stream_data(world, shuffle_buffer_tokens=640)
    full = fit_subprocess(_config(tmp_path / "full.yaml", tmp_path / "full", data, tmp_path / "full.tsv"))
    part = fit_subprocess(_config(tmp_path / "part.yaml", tmp_path / "part", data, tmp_path / "part.tsv"))

    def lines() -> int:
        p = tmp_path / "part.tsv"
        return len(p.read_text().splitlines()) if p.exists() else 0

    assert kill_when(part, lambda: lines() >= 14)
    code, out = finish(full)
    assert code == 0, out[-2000:]
    res = _config(tmp_path / "res.yaml", tmp_path / "part", data, tmp_path / "resumed.tsv")
    code, out = finish(fit_subprocess(res, "--ckpt_path", "last"))
    assert code == 0, out[-2000:]
    ref, after = read_losses(tmp_path / "full.tsv"), read_losses(tmp_path / "resumed.tsv")
    first = min(after)
    # resumed after a checkpoint (every 4 steps) inside the run: where exactly depends on how far the killed run got
    # between the poll that saw 14 steps and the kill (2 cores under load: a few steps); 30 steps stay in epoch 1
    assert 5 <= first <= 30 and sorted(after) == list(range(first, 31))
    assert all(after[s] == ref[s] for s in after)  # same batch hashes and bit-identical losses
    a, b = _state(tmp_path / "full"), _state(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_cli_bad_stream_settings_exit_2_nothing_written(world, tmp_path):
    for bad, want in ((dict(hook_point="blocks.10.hook_resid_pre"), "no layer 10"),
                      (dict(total_tokens=10**7), "data.total_tokens"),
                      (dict(model="nobody/missing-model"), "data.model: model 'nobody/missing-model' is neither")):
        run = tmp_path / "run"
        cfg = _config(tmp_path / "bad.yaml", run, _stream_data(world, **bad), tmp_path / "bad.tsv")
        code, out = finish(fit_subprocess(cfg, env={"HF_HUB_OFFLINE": "1"}))
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and want in errors[0], out[-1500:]
        assert not run.exists() and not (tmp_path / "bad.tsv").exists()
