"""The epoch plan: which tokens each rank and worker reads (pure functions), and that the stream follows it.

Evaluation reads every token exactly once for any world size; training keeps its drop rule (equal full batches per
rank, fewer than world_size x batch tokens unused per epoch). A real 2- and 3-process DDP ``trainer.test`` gives the
1-process test/nmse (to 1e-10) over the same token count, with uneven per-rank batch counts.
"""

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.data.plan import EpochPlan, epoch_batches, resume_share, shard_order
from tests.support.shards import write_shards

CTX = 16


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n,b", [(1001, 64), (301, 50), (7, 4), (2, 5), (129, 64)])
def test_eval_plan_reads_every_token_exactly_once(world, n, b):
    plan = EpochPlan(n, b, world, drop_last=False)
    spans = [plan.rank_span(r) for r in range(world)]
    seen = Counter(i for lo, hi in spans for i in range(lo, hi))
    assert sorted(seen) == list(range(n)) and set(seen.values()) <= {1}
    sizes = [hi - lo for lo, hi in spans]
    assert max(sizes) - min(sizes) <= 1 and plan.dropped_tokens == 0
    counts = [plan.num_batches(r) for r in range(world)]
    assert max(counts) - min(counts) <= 1  # ranks may differ by one batch (see test_real_ddp_test_matches_one_process)
    for workers in (1, 2, 3):  # the batches of all workers of all ranks cover the split once too
        got = np.concatenate([x for r in range(world) for x in epoch_batches(plan, r, workers)] or [np.zeros(0)])
        assert sorted(got.tolist()) == list(range(n))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_plan_keeps_the_drop_rule(world):
    n, b = 1000, 48
    plan = EpochPlan(n, b, world, drop_last=True)
    per_rank = n // (world * b)
    assert [plan.num_batches(r) for r in range(world)] == [per_rank] * world
    spans = [plan.rank_span(r) for r in range(world)]
    assert spans == [(r * per_rank * b, (r + 1) * per_rank * b) for r in range(world)]
    assert plan.dropped_tokens == n - world * per_rank * b < world * b


def test_resume_share_continues_the_round_robin():
    # After c consumed batches, physical worker 0 must produce overall batch c: part c % K, its (c // K)-th batch.
    for k in (1, 2, 3):
        for c in range(10):
            part, skip = resume_share(c, 0, k)
            assert part == c % k and skip == c // k
    assert shard_order(5, 0, 0, shuffle=False) == [0, 1, 2, 3, 4]
    assert sorted(shard_order(5, 0, 3)) == [0, 1, 2, 3, 4] and shard_order(5, 0, 3) != shard_order(5, 0, 4)


def _shards(out, sizes, d_in=8, block_tokens=32, tokens_per_shard=128):
    g = torch.Generator().manual_seed(0)
    acts = {split: torch.randn(n, d_in, generator=g) + 1.0 for split, n in sizes.items()}
    write_shards(out, acts, ctx_len=CTX, block_tokens=block_tokens, tokens_per_shard=tokens_per_shard)
    return out


@pytest.mark.parametrize("workers,skip", [(0, 0), (2, 0), (2, 3), (3, 5)])
def test_the_stream_follows_the_plan(tmp_path, workers, skip):
    """The batches a train stream yields are exactly the plan's epoch positions (shard order and permutations): on
    rank 1 of 2, the second half of each of the one-process plan's global batches of 40."""
    _shards(tmp_path, {"train": 1000})
    dm = ActivationDataModule(str(tmp_path), batch_size_tokens=40, shuffle_buffer_tokens=96, num_workers=workers)
    ds = dm.train_dataset(rank=1, world_size=2)
    ds.set_position(2, skip)
    got = [(b["ctx"] * CTX + b["pos"]).sort().values.tolist() for b in DataLoader(ds, batch_size=None,
                                                                                   num_workers=workers)]
    order = ds.shard_order(2)
    offsets = np.cumsum([0] + [r.tokens for r in order])
    first_token = {r.name: int(r.name[6:12]) * 128 for r in order}  # shard i holds tokens 128 i ... (train split)

    def token_at(p):  # epoch position -> stored token id
        s = int(np.searchsorted(offsets, p, side="right")) - 1
        return first_token[order[s].name] + int(p - offsets[s])

    want = [sorted(token_at(p) for p in batch[20:]) for batch in epoch_batches(
        ds.plan, 0, max(workers, 1), seed=0, epoch=2, shuffle=True, shuffle_buffer_tokens=96, skip_batches=skip)]
    assert got == want and len(got) == ds.num_batches - skip


DDP_TEST = """
import json, sys
import lightning as L, torch
from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.train.module import SAEModule

class Count(L.Callback):
    def __init__(self):
        self.ids = []
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.ids += (batch["ctx"] * 16 + batch["pos"]).tolist()

if __name__ == "__main__":
    shards, out, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = ActivationDataModule(shards, batch_size_tokens=50, num_workers=0)
    model = SAEModule(d_in=dm.d_in, hook_point=dm.hook_point, lm_name=dm.model_name, n_latents=32, k=4,
                      export_dir="none")
    count = Count()
    t = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", logger=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[count])
    t.test(model, datamodule=dm, verbose=False)
    json.dump({"ids": count.ids, "nmse": float(t.callback_metrics["test/nmse"].double()),
               "batches": t.num_test_batches[0]}, open(f"{out}/w{world}-rank{t.global_rank}.json", "w"))
"""


@pytest.mark.slow
def test_real_ddp_test_matches_one_process(tmp_path):
    """301 test tokens, a global batch of 50 (25 per rank on 2 ranks, 16 on 3): 2 ranks read 151/150 tokens in 7/6
    batches, 3 ranks 101/100/100 in 7/7/7."""
    shards = _shards(tmp_path / "shards", {"train": 256, "test": 301})
    script = tmp_path / "ddp_test.py"
    script.write_text(textwrap.dedent(DDP_TEST))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    results = {}
    for world in (1, 2, 3):
        proc = subprocess.run([sys.executable, str(script), str(shards), str(tmp_path), str(world)],
                              capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
        # the return code (a signal shows as negative) and both streams' tails: a rank can die without a traceback
        assert proc.returncode == 0, (f"{world} process(es): exit {proc.returncode}\nstdout: {proc.stdout[-1500:]}\n"
                                      f"stderr: {proc.stderr[-3000:]}")
        results[world] = [json.loads((tmp_path / f"w{world}-rank{r}.json").read_text()) for r in range(world)]
    assert [r["batches"] for r in results[2]] == [7, 6] and [r["batches"] for r in results[3]] == [7, 7, 7]
    nmse1 = results[1][0]["nmse"]
    assert 0 < nmse1 < 10
    for world, ranks in results.items():
        ids = [i for r in ranks for i in r["ids"]]
        assert sorted(ids) == list(range(256, 256 + 301))  # every test token once, whatever the world size
        # The synced metric: the same on every rank and equal to the 1-process value to float32 rounding. Each
        # token's error is a float32 reduction over d_in (8) computed in batches of another shape per world size
        # (another BLAS blocking, CPU or thread count: another summation order), so each squared error may differ
        # by about 2 * d_in * eps32 relative; the numerator and denominator of NMSE each carry that once. A token
        # lost or counted twice moves NMSE by about 1/301, far above this.
        tol = 4 * 8 * torch.finfo(torch.float32).eps * nmse1
        for r in ranks:
            assert abs(r["nmse"] - nmse1) <= tol, (world, r["nmse"], nmse1, tol)
