"""Throughput of ActivationDataModule (token shuffle included) on synthetic shards, and an A/B of shard readers.

Writes synthetic fp16 shards into a temporary folder with ShardWriter, then times full training epochs through
``train_dataloader()`` for each worker count and prints activations/s. Exits 1 if the best rate is below --min-rate.

``--ab`` instead compares, in one run and in-process, three ways of getting every row of the same data into
window buffers (what the stream does before shuffling): webdataset's own pipeline (``WebDataset(...).decode()``)
over the tar shards, lit-sae's reader over the same tars (:func:`lit_sae.data.reader.read_range`; memory-mapped as
for local files, and streamed as for URLs), and a
memory-mapped layout of the same rows (one ``.npy`` per shard opened with ``np.load(mmap_mode="r")``, and
safetensors files read by row slices). Rounds are interleaved so that a change in machine load hits all readers;
rows/s (wall) and rows per CPU-second are printed per reader, with ratios to lit-sae's reader.

    .venv/bin/python scripts/bench_data.py                      # d_in 768, fp16, 1M tokens, workers 0,1,2
    .venv/bin/python scripts/bench_data.py --tokens 262144 --workers 1
    .venv/bin/python scripts/bench_data.py --ab --tokens 262144 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.data.manifest import LMInfo, Manifest, ShardInfo, SplitInfo, read_manifest, write_manifest_atomic
from lit_sae.data.reader import ShardRef, read_range
from lit_sae.data.writer import ShardWriter


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
    write_manifest_atomic(out, Manifest(d_in=d_in, dtype=dtype, block_tokens=block_tokens,
                                        splits={"train": SplitInfo([ShardInfo(**i) for i in infos])},
                                        tokens_per_shard=tokens_per_shard, context_length=64,
                                        hook_point="synthetic", lm=LMInfo(name="synthetic")))


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


# ---- A/B of readers ------------------------------------------------------------------------------------------------

WINDOW = 65536  # rows per window buffer, the stream's default shuffle buffer


class _Windows:
    """Copies row pieces into one reused window buffer, as the stream does before shuffling; counts rows."""

    def __init__(self, d_in: int):
        self.acts = np.empty((WINDOW, d_in), np.float16)
        self.ids = np.empty((3, WINDOW), np.int64)
        self.fill = self.rows = 0

    def put(self, acts: np.ndarray, tok, ctx, pos) -> None:
        i = 0
        while i < len(acts):
            m = min(len(acts) - i, WINDOW - self.fill)
            self.acts[self.fill:self.fill + m] = acts[i:i + m]
            for c, a in enumerate((tok, ctx, pos)):
                self.ids[c, self.fill:self.fill + m] = a[i:i + m]
            self.fill = (self.fill + m) % WINDOW
            self.rows += m
            i += m


def read_lit_sae(out: str, manifest: Manifest, mapped: bool = True) -> int:
    """lit-sae's tar walker over the tar shards: memory-mapped (local files, the default) or streamed (URLs) into
    reused member buffers; zero-copy .npy views either way."""
    refs = [ShardRef(os.path.join(out, s.name), s.name, s.tokens) for s in manifest.splits["train"].shards]
    w = _Windows(manifest.d_in)
    for piece in read_range(refs, manifest, 0, manifest.split_tokens("train"), buffers={}, mapped=mapped):
        w.put(piece["acts"], piece["tok"], piece["ctx"], piece["pos"])
    return w.rows


def read_lit_sae_streamed(out: str, manifest: Manifest) -> int:
    """lit-sae's tar walker reading the file as a stream (the path URLs take)."""
    return read_lit_sae(out, manifest, mapped=False)


def read_webdataset(out: str, manifest: Manifest) -> int:
    """webdataset's own pipeline over the same tars: WebDataset + its default .npy decoder."""
    import webdataset as wds

    urls = [os.path.join(out, s.name) for s in manifest.splits["train"].shards]
    w = _Windows(manifest.d_in)
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        w.put(sample["acts.npy"], sample["tok.npy"], sample["ctx.npy"], sample["pos.npy"])
    return w.rows


def write_mapped(out: str, manifest: Manifest) -> None:
    """The same rows as one .npy (acts, ids) and one safetensors file per shard, for the memory-mapped readers."""
    from safetensors.numpy import save_file

    for s in manifest.splits["train"].shards:
        ref = ShardRef(os.path.join(out, s.name), s.name, s.tokens)
        pieces = [{k: np.array(v) for k, v in p.items()} for p in read_range([ref], manifest, 0, s.tokens)]
        acts = np.concatenate([p["acts"] for p in pieces])
        ids = np.stack([np.concatenate([p[k].astype(np.int64) for p in pieces]) for k in ("tok", "ctx", "pos")])
        stem = os.path.join(out, s.name[:-4])
        np.save(stem + ".acts.npy", acts)
        np.save(stem + ".ids.npy", ids)
        save_file({"acts": acts, "ids": ids}, stem + ".safetensors")


def read_memmap(out: str, manifest: Manifest) -> int:
    """np.memmap layout: slices of memory-mapped .npy files, a window at a time."""
    w = _Windows(manifest.d_in)
    for s in manifest.splits["train"].shards:
        stem = os.path.join(out, s.name[:-4])
        acts, ids = np.load(stem + ".acts.npy", mmap_mode="r"), np.load(stem + ".ids.npy", mmap_mode="r")
        for a in range(0, len(acts), WINDOW):
            w.put(acts[a:a + WINDOW], ids[0, a:a + WINDOW], ids[1, a:a + WINDOW], ids[2, a:a + WINDOW])
    return w.rows


def read_safetensors(out: str, manifest: Manifest) -> int:
    """safetensors layout: row slices (``get_slice``) of one file per shard, a window at a time."""
    from safetensors import safe_open

    w = _Windows(manifest.d_in)
    for s in manifest.splits["train"].shards:
        with safe_open(os.path.join(out, s.name[:-4]) + ".safetensors", "np") as f:
            acts, ids = f.get_slice("acts"), f.get_slice("ids")
            for a in range(0, s.tokens, WINDOW):
                b = min(a + WINDOW, s.tokens)
                i = ids[:, a:b]
                w.put(acts[a:b], i[0], i[1], i[2])
    return w.rows


READERS = {"webdataset pipeline (tar)": read_webdataset, "lit-sae reader (tar)": read_lit_sae,
           "lit-sae reader, streamed (tar)": read_lit_sae_streamed, "np.memmap (.npy)": read_memmap,
           "safetensors slices": read_safetensors}


def ab(out: str, rounds: int) -> None:
    """Time every reader ``rounds`` times, interleaved; print rows/s and rows per CPU-second with ratios."""
    manifest = read_manifest(out)
    write_mapped(out, manifest)
    n = manifest.split_tokens("train")
    wall: dict[str, list[float]] = {k: [] for k in READERS}
    cpu: dict[str, list[float]] = {k: [] for k in READERS}
    for _ in range(rounds):
        for name, fn in READERS.items():
            t0, c0 = time.perf_counter(), _cpu_seconds()
            rows = fn(out, manifest)
            t, c = time.perf_counter() - t0, _cpu_seconds() - c0
            assert rows == n, (name, rows, n)
            wall[name].append(n / t)
            cpu[name].append(n / max(c, 1e-9))
    ref_wall, ref_cpu = max(wall["lit-sae reader (tar)"]), max(cpu["lit-sae reader (tar)"])
    print(f"A/B: {n:,} rows x {manifest.d_in} {manifest.dtype}, best of {rounds} interleaved rounds "
          f"(load average {os.getloadavg()[0]:.1f}); ratios are to lit-sae's reader")
    print(f"{'reader':32s} {'rows/s':>12s} {'ratio':>6s} {'rows/CPU-s':>12s} {'ratio':>6s}")
    for name in READERS:
        bw, bc = max(wall[name]), max(cpu[name])
        print(f"{name:32s} {bw:12,.0f} {bw / ref_wall:6.2f} {bc:12,.0f} {bc / ref_cpu:6.2f}")


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
    p.add_argument("--ab", action="store_true", help="compare shard readers and layouts instead (see above)")
    args = p.parse_args()

    out = args.dir or tempfile.mkdtemp(prefix="lit-sae-bench-")
    try:
        t0 = time.perf_counter()
        make_synthetic(out, args.tokens, args.d_in, args.dtype, args.block_tokens, args.tokens_per_shard)
        print(f"wrote {args.tokens:,} tokens x {args.d_in} {args.dtype} to {out} in {time.perf_counter() - t0:.1f}s")
        if args.ab:
            ab(out, args.epochs)
            return 0
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
