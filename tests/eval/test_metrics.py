"""lit_sae.eval.metrics: exact values, one batch == many batches == 2 DDP ranks."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_sae.eval.metrics import L0, FeatureDensity, NormalizedMSE, RelativeMSE

N, D, K, NL = 96, 12, 4, 40


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    # Large mean, as LM activations have: per-batch means would give a different (wrong) NMSE denominator.
    x = torch.randn(N, D, generator=g) * 2 + 5.0
    x_hat = x + 0.3 * torch.randn(N, D, generator=g)
    vals = torch.relu(torch.randn(N, K, generator=g))  # some zeros: L0 < K
    idx = torch.stack([torch.randperm(NL, generator=g)[:K] for _ in range(N)])
    return x, x_hat, vals, idx


def _reference(x, x_hat, vals, idx):
    x, x_hat = x.double(), x_hat.double()
    nmse = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    rel = (((x - x_hat) ** 2).sum(1) / (x**2).sum(1)).mean()
    l0 = (vals > 0).double().sum(1).mean()
    dens = torch.zeros(NL, dtype=torch.float64)
    for r in range(N):
        for v, i in zip(vals[r], idx[r]):
            if v > 0:
                dens[i] += 1
    return nmse, rel, l0, dens / N


def _run(metrics, x, x_hat, vals, idx, chunks):
    nm, rm, l0, fd = metrics
    for xs, xhs, vs, iis in zip(x.chunk(chunks), x_hat.chunk(chunks), vals.chunk(chunks), idx.chunk(chunks)):
        nm.update(xs, xhs)
        rm.update(xs, xhs)
        l0.update(vs)
        fd.update(vs, iis)
    return nm.compute(), rm.compute(), l0.compute(), fd.compute()


def _new():
    return NormalizedMSE(), RelativeMSE(), L0(), FeatureDensity(NL)


@pytest.mark.parametrize("chunks", [1, 7, N])
def test_batches_match_reference(chunks):
    data = _data()
    got = _run(_new(), *data, chunks=chunks)
    ref = _reference(*data)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_nmse_uses_global_mean_and_known_values():
    x = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
    m = NormalizedMSE()
    m.update(x[:2], x[:2] + 1)  # per-batch mean would give denominator 2 + 2 = 4
    m.update(x[2:], x[2:] + 1)
    # global mean 6: denominator 36 + 16 + 16 + 36 = 104; numerator 4
    assert m.compute().item() == pytest.approx(4 / 104, rel=1e-12)
    m2 = NormalizedMSE()
    m2.update(x, x)
    assert m2.compute().item() == 0.0


def test_feature_density_dead_and_histogram():
    fd = FeatureDensity(4)
    vals = torch.tensor([[1.0, 0.0], [2.0, 3.0], [1.0, 1.0], [1.0, 0.5]])
    idx = torch.tensor([[0, 3], [0, 1], [0, 1], [0, 2]])  # latent 3 only has a zero value: dead
    fd.update(vals, idx)
    torch.testing.assert_close(fd.compute(), torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert fd.dead_fraction().item() == 0.25
    counts, edges = fd.log_density_histogram(bins=4, low=-1.0, high=0.0)
    assert counts.sum().item() == 3 and len(edges) == 5
    l0 = L0()
    l0.update(vals)
    assert l0.compute().item() == pytest.approx(7 / 4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, x_hat, vals, idx = _data()
        # Unequal, interleaved shares: rank 0 gets rows 0..59, rank 1 rows 60..95, each in a few batches.
        sl = slice(0, 60) if rank == 0 else slice(60, N)
        got = _run(_new(), x[sl], x_hat[sl], vals[sl], idx[sl], chunks=3)
        if rank == 0:
            torch.save([g.clone() for g in got], out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_equal_single(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    ref = _run(_new(), *_data(), chunks=1)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert not math.isnan(got[0].item())
