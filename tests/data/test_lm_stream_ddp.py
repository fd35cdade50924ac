"""The LM stream's DDP stop rule on two gloo processes: ranks whose batch counts differ end the epoch together."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_sae.data.lm_stream.dataset import _all_ranks_have_one


def _rank(rank: int, init: str, counts: list, out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        got = list(_all_ranks_have_one(iter(range(counts[rank]))))
        out.put((rank, got))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: over 10 s on 2 busy cores
def test_ranks_stop_at_the_first_batch_one_of_them_lacks(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_rank, args=(r, init, [5, 3], out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    assert results == {0: [0, 1, 2], 1: [0, 1, 2]}  # rank 0's last two batches are not used: no rank hangs
    assert torch.distributed.is_available()
