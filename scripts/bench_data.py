"""Throughput of ActivationDataModule (token shuffle included) on synthetic shards.

Writes synthetic fp16 shards into a temporary folder with ShardWriter, then times full training epochs through
``train_dataloader()`` for each worker count and prints activations/s. Exits 1 if the best rate is below --min-rate.

    .venv/bin/python scripts/bench_data.py                      # d_in 768, fp16, 1M tokens, workers 0,1,2
    .venv/bin/python scripts/bench_data.py --tokens 262144 --workers 1
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import torch

from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.data.shards import FORMAT, ShardWriter, write_manifest_atomic


def make_synthetic(out: str, tokens: int, d_in: int, dtype: str, block_tokens: int, tokens_per_shard: int) -> None:
    """Random activations in shards of the lit-sae format (written in chunks to bound memory)."""
    infos: list[dict] = []
    g = torch.Generator().manual_seed(0)
    chunk = 65536
    with ShardWriter(out, "train", d_in, dtype, block_tokens, tokens_per_shard, on_shard=infos.append) as w:
        for start in range(0, tokens, chunk):
            n = min(chunk, tokens - start)
            ids = torch.arange(start, start + n)
            w.add(torch.randn(n, d_in, generator=g), ids % 50000, ids // 64, ids % 64)
    manifest = {"format": FORMAT, "d_in": d_in, "dtype": dtype, "block_tokens": block_tokens,
                "tokens_per_shard": tokens_per_shard, "context_length": 64, "hook_point": "synthetic",
                "model": {"name_or_path": "synthetic"}, "complete": True,
                "splits": {"train": {"shards": infos, "tokens": tokens}}}
    write_manifest_atomic(out, manifest)


def _cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (DataLoader workers are reaped at the end of a pass)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_epoch(dm: ActivationDataModule) -> tuple[int, float, float]:
    """(tokens delivered, wall seconds, CPU seconds of all our processes) for one pass over train_dataloader()."""
    n = 0
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for batch in dm.train_dataloader():
        n += batch["acts"].shape[0]
    return n, time.perf_counter() - t0, _cpu_seconds() - c0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--block-tokens", type=int, default=4096)
    p.add_argument("--tokens-per-shard", type=int, default=1 << 17)
    p.add_argument("--batch-size-tokens", type=int, default=4096)
    p.add_argument("--shuffle-buffer-tokens", type=int, default=65536)
    p.add_argument("--workers", default="0,1,2", help="comma-separated num_workers values to time")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per setting (the best is reported)")
    p.add_argument("--min-rate", type=float, default=400_000, help="activations/s the best setting must reach")
    p.add_argument("--dir", default=None, help="shard folder to (re)use instead of a temporary one")
    args = p.parse_args()

    out = args.dir or tempfile.mkdtemp(prefix="lit-sae-bench-")
    try:
        t0 = time.perf_counter()
        make_synthetic(out, args.tokens, args.d_in, args.dtype, args.block_tokens, args.tokens_per_shard)
        print(f"wrote {args.tokens:,} tokens x {args.d_in} {args.dtype} to {out} in {time.perf_counter() - t0:.1f}s")
        best = 0.0
        for workers in [int(w) for w in args.workers.split(",")]:
            dm = ActivationDataModule(out, batch_size_tokens=args.batch_size_tokens,
                                      shuffle_buffer_tokens=args.shuffle_buffer_tokens, num_workers=workers)
            rates, cpu_rates = [], []
            for _ in range(args.epochs):
                n, wall, cpu = time_epoch(dm)
                rates.append(n / wall)
                cpu_rates.append(n / cpu)
            best = max(best, max(rates))
            # The CPU figure (activations per CPU-second of all our processes) does not depend on what else runs.
            print(f"num_workers={workers}: " + ", ".join(f"{r:,.0f}" for r in rates) + " activations/s wall; "
                  + ", ".join(f"{r:,.0f}" for r in cpu_rates) + " per CPU-second "
                  f"(batch {args.batch_size_tokens}, shuffle buffer {args.shuffle_buffer_tokens} tokens, "
                  f"load average {os.getloadavg()[0]:.1f})")
        ok = best >= args.min_rate
        print(f"best {best:,.0f} activations/s: {'PASS' if ok else 'FAIL'} (target {args.min_rate:,.0f}; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
        return 0 if ok else 1
    finally:
        if args.dir is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
