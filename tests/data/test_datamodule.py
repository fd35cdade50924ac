"""ActivationDataModule: exactly-once epochs over ranks x workers, determinism, exact resume, bad input."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lit_sae.data.datamodule import ActivationDataModule, ActivationStream
from lit_sae.data.shards import ShardError, ShardNotFoundError, write_manifest_atomic
from tests.support.shards import write_shards

CTX_LEN = 16


def make_shards(out, splits=None, d_in=8, dtype="float16", block_tokens=32, tokens_per_shard=128, seed=0,
                nan_rows=()):
    """Synthetic shards (tests/support/shards.py): token i has ctx i // CTX_LEN, pos i % CTX_LEN (so (ctx, pos) names it)."""
    splits = {"train": 1000, "val": 300, "test": 200} if splits is None else splits
    g = torch.Generator().manual_seed(seed)
    acts = {}
    for split, n in splits.items():
        acts[split] = torch.randn(n, d_in, generator=g)
        for r in nan_rows if split == "train" else ():
            acts[split][r, r % d_in] = float("nan") if r % 2 else float("inf")
    return write_shards(out, acts, ctx_len=CTX_LEN, dtype=dtype, block_tokens=block_tokens,
                        tokens_per_shard=tokens_per_shard)


def ids_of(batch):
    """Global token ids of a batch (inverse of make_shards' ctx/pos)."""
    return (batch["ctx"] * CTX_LEN + batch["pos"]).tolist()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_shards(out)  # train: 1000 tokens in 8 shards (7 x 128 + 104): not a multiple of ranks x workers
    return str(out)


def run_epoch(dm, rank, world, workers, epoch=0, skip=0):
    ds = dm.train_dataset(rank=rank, world_size=world)
    ds.set_position(epoch, skip)
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


def test_reads_manifest_in_init(shards):
    dm = ActivationDataModule(shards)
    assert dm.d_in == 8 and dm.dtype == "float16"
    assert dm.hook_point == "blocks.0.hook_resid_post" and dm.model_name == "synthetic-lm"
    assert dm.manifest["splits"]["train"]["tokens"] == 1000
    assert len(dm.shards("train")) == 8


@pytest.mark.parametrize("batch,world", [(48, 2), (50, 2), (48, 4)])
def test_global_batch_is_the_same_tokens_on_any_world_size(shards, batch, world):
    """data.batch_size_tokens is the global batch: W ranks hold batch / W rows each, and the W parts of step j are
    exactly step j of one process (the same rows in the same order), every token at most once per epoch."""
    dm = ActivationDataModule(shards, batch_size_tokens=batch, shuffle_buffer_tokens=96)
    one = run_epoch(dm, 0, 1, workers=2)
    per_rank = [run_epoch(dm, r, world, workers=2) for r in range(world)]
    n = 1000 // batch
    assert len(one) == n and [len(b) for b in per_rank] == [n] * world
    assert [len(dm.train_dataset(rank=r, world_size=world)) for r in range(world)] == [n] * world
    assert all(b["acts"].shape == (batch // world, 8) and b["acts"].dtype == torch.float16 for bs in per_rank
               for b in bs)
    for j in range(n):
        assert sum((ids_of(bs[j]) for bs in per_rank), []) == ids_of(one[j]), j
        assert torch.equal(torch.cat([bs[j]["acts"] for bs in per_rank]), one[j]["acts"])
    ids = [i for b in one for i in ids_of(b)]
    assert len(ids) == len(set(ids)) == n * batch
    # Drop rule: the unused tokens are the tail of the epoch's shard order.
    ds = dm.train_dataset(rank=0, world_size=world)
    order = [i for ref in ds.shard_order(0) for i in range(int(ref.name[6:12]) * 128, int(ref.name[6:12]) * 128
                                                            + ref.tokens)]
    assert set(range(1000)) - set(ids) == set(order[n * batch:])
    assert ds.dropped_tokens == 1000 - n * batch < batch


def test_a_global_batch_that_does_not_split_is_refused(shards):
    with pytest.raises(ValueError, match=r"data.batch_size_tokens=50 is the global batch .* multiple of 4"):
        ActivationDataModule(shards, batch_size_tokens=50).train_dataset(rank=0, world_size=4)


def test_worker_count_does_not_change_the_token_set(shards):
    dm = ActivationDataModule(shards, batch_size_tokens=40, shuffle_buffer_tokens=64)
    sets = []
    for workers in (0, 1, 3):
        sets.append(sorted(i for b in run_epoch(dm, 0, 1, workers) for i in ids_of(b)))
    assert sets[0] == sets[1] == sets[2] == list(range(1000))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_shared_memory_ring_delivers_the_same_batches(tmp_path, dtype):
    """The DataModule's loader moves worker batches through a shared-memory ring: it must deliver exactly what a
    plain DataLoader over the same stream delivers, as private tensors of the right dtypes."""
    make_shards(tmp_path, {"train": 700}, d_in=12, dtype=dtype)
    for workers in (1, 2):
        dm = ActivationDataModule(str(tmp_path), batch_size_tokens=64, shuffle_buffer_tokens=96, num_workers=workers)
        plain = run_epoch(dm, 0, 1, workers)
        ringed = list(dm.train_dataloader())  # first pass: epoch 0
        assert len(plain) == len(ringed) == 10
        for a, b in zip(plain, ringed):
            assert a.keys() == b.keys() == {"acts", "tok", "ctx", "pos"}
            assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert len({b["acts"].data_ptr() for b in ringed}) == len(ringed)  # private copies, not ring slots
    assert ringed[0]["acts"].dtype == (torch.float16 if dtype == "float16" else torch.bfloat16)
    assert ringed[0]["tok"].dtype == ringed[0]["ctx"].dtype == ringed[0]["pos"].dtype == torch.int64


def test_deterministic_and_token_level_shuffle(shards):
    dm = ActivationDataModule(shards, batch_size_tokens=50, shuffle_buffer_tokens=128)
    a = [ids_of(b) for b in run_epoch(dm, 0, 1, 2)]
    b = [ids_of(b) for b in run_epoch(dm, 0, 1, 2)]
    assert a == b
    assert a != [ids_of(b) for b in run_epoch(dm, 0, 1, 2, epoch=1)]
    dm2 = ActivationDataModule(shards, batch_size_tokens=50, shuffle_buffer_tokens=128, seed=1)
    assert a != [ids_of(b) for b in run_epoch(dm2, 0, 1, 2)]
    # Tokens are mixed across blocks (32 tokens) and contexts within a batch, not read in stored order.
    first = a[0]
    assert max(first) - min(first) >= 2 * len(first)  # not a run of stored tokens
    assert len({i // 32 for i in first}) >= 3 and len({i // CTX_LEN for i in first}) >= 6
    # The stored activations travel with their ids.
    dm0 = ActivationDataModule(shards, batch_size_tokens=1000, shuffle=False)
    stored = {i: row for b in run_epoch(dm0, 0, 1, 0) for i, row in zip(ids_of(b), b["acts"])}
    batch = run_epoch(dm, 0, 1, 0)[3]
    assert all(torch.equal(stored[i], row) for i, row in zip(ids_of(batch), batch["acts"]))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_exactly_the_consumed_batches(shards, workers):
    dm = ActivationDataModule(shards, batch_size_tokens=30, shuffle_buffer_tokens=100, num_workers=workers)
    full = [ids_of(b) for b in run_epoch(dm, 1, 2, workers, epoch=1)]
    for n in (1, 5, 8, len(full) - 1, len(full)):
        assert [ids_of(b) for b in run_epoch(dm, 1, 2, workers, epoch=1, skip=n)] == full[n:]


def test_state_dict_round_trip_without_trainer(shards):
    dm = ActivationDataModule(shards, batch_size_tokens=40, shuffle_buffer_tokens=64, num_workers=0)
    loader = dm.train_dataloader()
    epoch0 = [ids_of(b) for b in loader]
    it = iter(loader)  # epoch 1
    head = []
    for _ in range(7):
        head.append(ids_of(next(it)))
        dm.advance()
    state = dm.state_dict()
    assert state["epoch"] == 1 and state["batches_consumed"] == 7
    dm2 = ActivationDataModule(shards, batch_size_tokens=40, shuffle_buffer_tokens=64, num_workers=0)
    dm2.load_state_dict(state)
    tail = [ids_of(b) for b in dm2.train_dataloader()]
    full1 = [ids_of(b) for b in _at(dm.train_dataset(), 1)]
    assert head + tail == full1 and full1 != epoch0
    nxt = [ids_of(b) for b in dm2.train_dataloader()]  # the following pass is epoch 2 from its start
    assert nxt == [ids_of(b) for b in _at(dm.train_dataset(), 2)]


def _at(ds, epoch):
    ds.set_position(epoch, 0)
    return ds


def test_load_state_dict_with_other_layout_names_the_keys(shards):
    dm = ActivationDataModule(shards, batch_size_tokens=40, num_workers=2)
    state = dm.state_dict()
    other = ActivationDataModule(shards, batch_size_tokens=40, num_workers=1)
    with pytest.raises(ValueError, match=r"num_workers: checkpoint 2, now 1"):
        other.load_state_dict(state)


class _Recorder(L.LightningModule):
    """Records the token ids of every training batch; trains nothing."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(ids_of(batch))
        return self.w * batch["acts"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     default_root_dir=str(tmp_path), **kw)


def test_lightning_resume_continues_the_stream(shards, tmp_path):
    """Fit 2 epochs with a checkpoint at step 7 (mid-epoch 0); resuming from it sees exactly the remaining batches."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = dict(batch_size_tokens=40, shuffle_buffer_tokens=64, num_workers=1)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=7, save_top_k=-1, filename="{step}")
    full = _Recorder()
    _trainer(tmp_path, callbacks=[ckpt]).fit(full, datamodule=ActivationDataModule(shards, **kw))
    assert len(full.seen) == 2 * 25
    assert full.seen[:25] != full.seen[25:]  # epochs differ
    for step in (7, 28):  # mid-epoch 0 and mid-epoch 1
        resumed = _Recorder()
        _trainer(tmp_path).fit(resumed, datamodule=ActivationDataModule(shards, **kw),
                               ckpt_path=str(tmp_path / "ck" / f"step={step}.ckpt"))
        assert resumed.seen == full.seen[step:]


def test_val_and_test_loaders_in_stored_order(shards):
    dm = ActivationDataModule(shards, batch_size_tokens=64, num_workers=0, val_tokens=200)
    val = list(dm.val_dataloader())
    assert [b["acts"].shape[0] for b in val] == [64, 64, 64, 8]
    assert [i for b in val for i in ids_of(b)] == list(range(1000, 1200))
    test = list(dm.test_dataloader())
    assert [i for b in test for i in ids_of(b)] == list(range(1300, 1500))


def test_missing_val_split_skips_validation_missing_test_split_raises(tmp_path):
    make_shards(tmp_path, {"train": 256})
    dm = ActivationDataModule(str(tmp_path))
    assert dm.val_dataloader() == []
    with pytest.raises(ShardError, match=r"manifest.json: split 'test' has no shards"):
        dm.test_dataloader()


def test_sample_activations_deterministic(shards):
    dm = ActivationDataModule(shards)
    a, b = dm.sample_activations(300), ActivationDataModule(shards).sample_activations(300)
    assert a.dtype == torch.float32 and a.shape == (300, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, ActivationDataModule(shards, seed=3).sample_activations(300))


def test_brace_pattern_and_urls(shards):
    dm = ActivationDataModule(os.path.join(shards, "{train,val,test}-{000000..000001}.tar"), batch_size_tokens=32,
                              shuffle=False, num_workers=0)
    assert [r.name for r in dm.shards("train")] == ["train-000000.tar", "train-000001.tar"]
    assert sum(len(ids_of(b)) for b in dm.train_dataloader()) == 256
    with pytest.raises(ShardError, match="names shards the manifest does not list"):
        ActivationDataModule(os.path.join(shards, "train-{000000..000009}.tar"))
    for url in ("file://" + shards, f"pipe:cat {shards}"):  # any scheme webdataset's gopen opens
        dm = ActivationDataModule(url, batch_size_tokens=100, num_workers=0)
        assert sorted(i for b in dm.train_dataloader() for i in ids_of(b)) == list(range(1000))


# ---- DDP -------------------------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import json, sys
import lightning as L, torch
from lit_sae.data.datamodule import ActivationDataModule

class Rec(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []
    def training_step(self, batch, i):
        self.seen += (batch["ctx"] * 16 + batch["pos"]).tolist()
        return self.w * batch["acts"].float().mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

if __name__ == "__main__":
    shards, out = sys.argv[1], sys.argv[2]
    m = Rec()
    t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)
    t.fit(m, datamodule=ActivationDataModule(shards, batch_size_tokens=48, shuffle_buffer_tokens=96, num_workers=2))
    json.dump(m.seen, open(f"{out}/rank{t.global_rank}.json", "w"))
"""


@pytest.mark.slow
def test_real_ddp_two_ranks_two_workers(shards, tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), shards, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 10 * 48  # equal batch counts: 1000 // (2 * 48) = 10 per rank
    assert len(set(seen[0]) | set(seen[1])) == 2 * 10 * 48  # distinct tokens across ranks


# ---- bad input -------------------------------------------------------------------------------------------------------


def test_unlisted_and_temporary_shards_are_never_read(tmp_path):
    """A crash can leave a .tmp shard, or a complete shard the manifest does not list yet: readers ignore both."""
    make_shards(tmp_path, {"train": 256})
    (tmp_path / "train-000002.tar.tmp").write_bytes(b"half a shard")
    (tmp_path / "train-000002.tar").write_bytes((tmp_path / "train-000000.tar").read_bytes())
    dm = ActivationDataModule(str(tmp_path), batch_size_tokens=64, num_workers=0)
    assert [r.name for r in dm.shards("train")] == ["train-000000.tar", "train-000001.tar"]
    assert sorted(i for b in dm.train_dataloader() for i in ids_of(b)) == list(range(256))


def test_missing_folder(tmp_path):
    with pytest.raises(ShardNotFoundError, match=r"nope: shard folder does not exist.*lit-sae harvest"):
        ActivationDataModule(str(tmp_path / "nope"))


def test_empty_folder(tmp_path):
    with pytest.raises(ShardNotFoundError, match=r"manifest.json: manifest not found \(the folder is empty\)"):
        ActivationDataModule(str(tmp_path))


def test_missing_manifest(tmp_path):
    make_shards(tmp_path, {"train": 128})
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(ShardNotFoundError, match=r"manifest.json: manifest not found \(the folder holds 1 other"):
        ActivationDataModule(str(tmp_path))


def test_missing_shard_listed_in_manifest(tmp_path):
    make_shards(tmp_path, {"train": 256})
    os.remove(tmp_path / "train-000001.tar")
    with pytest.raises(ShardNotFoundError, match=r"train-000001.tar: shard listed in .*manifest.json is missing"):
        ActivationDataModule(str(tmp_path))


def _first_error(dm, workers=0):
    dm.num_workers = workers
    with pytest.raises(ShardError) as info:
        for _ in dm.train_dataloader():
            pass
    return str(info.value)


@pytest.mark.parametrize("cut", [0.5, 0.0])
def test_truncated_tar(tmp_path, cut):
    make_shards(tmp_path, {"train": 256})
    path = tmp_path / "train-000001.tar"
    data = path.read_bytes()
    # 0.5: cut inside a member's data; 0.0: cut at the first member boundary after 3 blocks (tar ends "cleanly").
    n = int(len(data) * cut) if cut else data.index(b"train-000001-00003.acts.npy")
    path.write_bytes(data[:n])
    msg = _first_error(ActivationDataModule(str(tmp_path), batch_size_tokens=64, shuffle=False))
    assert "train-000001.tar" in msg
    assert ("truncated" in msg) and "harvest" in msg


def test_corrupt_tar(tmp_path):
    make_shards(tmp_path, {"train": 256})
    path = tmp_path / "train-000000.tar"
    data = bytearray(path.read_bytes())
    data[600:1100] = os.urandom(500)  # garbage over the second member's header
    path.write_bytes(bytes(data))
    msg = _first_error(ActivationDataModule(str(tmp_path), batch_size_tokens=64, shuffle=False), workers=1)
    assert "train-000000.tar" in msg and ("corrupt" in msg)


def test_flipped_bytes_caught_by_verify(tmp_path):
    make_shards(tmp_path, {"train": 256})
    dm = ActivationDataModule(str(tmp_path), verify=True)
    dm.setup("fit")  # intact: passes
    path = tmp_path / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF  # inside activation data: format checks cannot see it
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000001.tar: sha256 .* differs from manifest.json"):
        ActivationDataModule(str(tmp_path), verify=True).setup("fit")


def test_wrong_shape_vs_manifest(tmp_path):
    man = make_shards(tmp_path, {"train": 256})
    man["d_in"] = 6
    write_manifest_atomic(str(tmp_path), man)
    msg = _first_error(ActivationDataModule(str(tmp_path), batch_size_tokens=64))
    assert "train-00000" in msg and "acts shape is (32, 8), expected (T, 6)" in msg


def test_wrong_dtype_vs_manifest(tmp_path):
    man = make_shards(tmp_path, {"train": 256})
    man["dtype"] = "bfloat16"
    write_manifest_atomic(str(tmp_path), man)
    msg = _first_error(ActivationDataModule(str(tmp_path), batch_size_tokens=64))
    assert ".tar (block train-00000" in msg and "acts dtype is float16, but manifest dtype 'bfloat16'" in msg


def test_nonfinite_raises_by_default(tmp_path):
    make_shards(tmp_path, {"train": 256}, nan_rows=(5, 200))
    msg = _first_error(ActivationDataModule(str(tmp_path), batch_size_tokens=64), workers=1)
    assert ".tar (block" in msg and "NaN/Inf" in msg and "skip_nonfinite" in msg


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_nonfinite_skipped_and_counted(tmp_path, caplog, dtype):
    make_shards(tmp_path, {"train": 256}, dtype=dtype, nan_rows=(5, 200, 201))
    dm = ActivationDataModule(str(tmp_path), batch_size_tokens=64, skip_nonfinite=True, num_workers=0)
    ids = []
    with caplog.at_level(logging.WARNING):
        for batch in dm.train_dataloader():
            batch = dm.on_before_batch_transfer(batch, 0)  # what Lightning calls for each batch
            assert "nonfinite_skipped" not in batch and torch.isfinite(batch["acts"].float()).all()
            ids += ids_of(batch)
    assert dm.nonfinite_skipped == 3
    assert sorted(ids) == sorted(set(range(256)) - {5, 200, 201})
    assert "skipped" in caplog.text and "NaN/Inf" in caplog.text


def test_train_split_smaller_than_a_batch(tmp_path):
    make_shards(tmp_path, {"train": 100})
    with pytest.raises(ShardError, match=r"train split has 100 tokens, fewer than one global batch"):
        ActivationDataModule(str(tmp_path), batch_size_tokens=128).train_dataset(rank=0, world_size=2)


def test_stream_sizes_without_datamodule(shards):
    dm = ActivationDataModule(shards)
    ds = ActivationStream(dm.shards("val"), dm.manifest, batch_size_tokens=64, rank=1, world_size=2, shuffle=False,
                          drop_last=False)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(batches) == len(ds) == 3 and sum(len(ids_of(b)) for b in batches) == 150
    assert sorted(i for b in batches for i in ids_of(b)) == list(range(1150, 1300))
    assert np.all(np.diff(sorted(i for b in batches for i in ids_of(b))) == 1)
