"""Step time of one SAE training step: one process vs 2-process data parallel vs 2-way tensor parallel (CPU, gloo).

Same global batch and model in every mode (fp32, fast kernels, Adam, decoder constraints, AuxK with a fixed 10% dead
set, no data loading):
    single   one process, the whole batch (1 torch thread; ``single-2t``: 2 threads, the fair CPU budget)
    ddp2     2 processes x 1 thread, each half the batch; losses' batch statistics and gradients all-reduced
             (``lit_sae.parallel.data_parallel.GroupSum`` + a gradient all-reduce: DDP's math without Lightning)
    tp2      2 processes x 1 thread, each holding half the latents and the whole batch (``ShardedTopKSAE``)
Prints the median step time per mode and its ratio to ``single``. On a machine shared with other jobs the absolute
times mean little; read the ratios, measured in one run.

``--fit`` measures the same three layouts end to end through ``lit-sae fit`` (Lightning, data loading from
synthetic shards, logging): ``single`` (1 process), ``ddp2`` (``--trainer.strategy ddp``, 2 processes of half the
batch each) and ``tp2`` (``SAEModelParallelStrategy`` 1 x 2, both processes on the whole batch); the step time is
read from the logged ``tokens_per_s`` (global batch / time between consecutive steps), median after the warm-up.

    .venv/bin/python scripts/bench_parallel.py                      # d_in 768, n 16384, k 32, batch 4096
    .venv/bin/python scripts/bench_parallel.py --n-latents 4096 --batch 1024 --steps 5   # quick
    .venv/bin/python scripts/bench_parallel.py --fit --d-in 256 --n-latents 8192 --batch 2048 --steps 20
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world: int, mode: str, args, port: int, out) -> None:
    from lit_sae.parallel.data_parallel import GroupSum
    from lit_sae.parallel.tensor import ShardedTopKSAE, average_gradients_
    from lit_sae.sae.model import TopKSAE

    torch.set_num_threads(2 if mode == "single-2t" else 1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    full = TopKSAE(args.d_in, args.n_latents, args.k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.d_in, generator=g) + 0.5
    dead = torch.rand(args.n_latents, generator=g) < 0.1
    if mode == "tp2":
        sae = ShardedTopKSAE.from_full(full, dist.group.WORLD)
        dead = dead[sae.local_rows()]
        dp_group = None
    else:
        sae, dp_group = full, (dist.group.WORLD if world > 1 else None)
        if world > 1:
            sae.batch_sum = GroupSum(dp_group)
            x = x.chunk(world)[rank]
    del full
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    times = []
    for step in range(args.warmup + args.steps):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        out_ = sae(x, dead)
        out_.loss.backward()
        average_gradients_(sae, dp_group)
        sae.remove_parallel_grads_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        if world > 1:
            dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        out[mode] = statistics.median(times)
    if world > 1:
        dist.destroy_process_group()


def _fit_times(args) -> dict[str, float]:
    """Median step time of ``lit-sae fit`` per layout, on synthetic shards in a temporary folder."""
    import csv
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import yaml

    from lit_sae.data.shards import FORMAT, ShardWriter, write_manifest_atomic

    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        n = (steps + 2) * args.batch
        g = torch.Generator().manual_seed(0)
        infos: list = []
        with ShardWriter(str(shards), "train", args.d_in, "float16", 1024, 1 << 16, on_shard=infos.append) as w:
            for start in range(0, n, 1 << 14):
                rows = min(1 << 14, n - start)
                ids = torch.arange(start, start + rows)
                w.add(torch.randn(rows, args.d_in, generator=g) + 0.5, ids % 1000, ids // 64, ids % 64)
        write_manifest_atomic(str(shards), {"format": FORMAT, "d_in": args.d_in, "dtype": "float16",
                                            "block_tokens": 1024, "tokens_per_shard": 1 << 16, "context_length": 64,
                                            "hook_point": "blocks.0.hook_resid_post", "lm": {"name": "synthetic"},
                                            "splits": {"train": {"shards": infos}}})
        strategy = "lit_sae.parallel.strategy.SAEModelParallelStrategy"
        layouts = {"single": (1, args.batch, ["--trainer.devices", "1"]),
                   "ddp2": (2, args.batch, ["--trainer.devices", "2", "--trainer.strategy", "ddp"]),  # global batch
                   "tp2": (2, args.batch, ["--trainer.devices", "2", "--trainer.strategy", strategy,
                                           "--trainer.strategy.data_parallel_size", "1",
                                           "--trainer.strategy.tensor_parallel_size", "2"])}
        times = {}
        for mode, (_, batch, extra) in layouts.items():
            root = Path(tmp) / mode
            cfg = {"seed_everything": 0,
                   "trainer": {"default_root_dir": str(root), "max_steps": steps, "precision": "32-true",
                               "accelerator": "cpu", "log_every_n_steps": 1, "limit_val_batches": 0,
                               "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_checkpointing": False,
                               "enable_model_summary": False,
                               "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                          "init_args": {"save_dir": str(root), "name": "csv", "version": 0}}},
                   "model": {"n_latents": args.n_latents, "k": args.k, "export_dir": "none", "init_tokens": 4096},
                   "data": {"class_path": "lit_sae.data.datamodule.ActivationDataModule",
                            "init_args": {"path": str(shards), "batch_size_tokens": batch,
                                          "shuffle_buffer_tokens": batch, "num_workers": 0}}}
            root.mkdir()
            (root / "config.yaml").write_text(yaml.safe_dump(cfg))
            lit_sae = Path(sys.executable).parent / "lit-sae"
            subprocess.run([str(lit_sae), "fit", "--config", str(root / "config.yaml"), *extra], check=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
            rows = list(csv.DictReader(open(root / "csv" / "version_0" / "metrics.csv")))
            rates = [float(r["tokens_per_s"]) for r in rows if r.get("tokens_per_s")][args.warmup:]
            times[mode] = statistics.median(args.batch / r for r in rates)
        return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--n-latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="global batch (tokens per step)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fit", action="store_true", help="time `lit-sae fit` end to end (Lightning, data, logging)")
    args = p.parse_args()
    if args.fit:
        results = _fit_times(args)
    else:
        with mp.Manager() as manager:
            out = manager.dict()
            for mode, world in (("single", 1), ("single-2t", 1), ("ddp2", 2), ("tp2", 2)):
                mp.spawn(_run, args=(world, mode, args, _free_port(), out), nprocs=world, join=True)
            results = dict(out)
    base = results["single"]
    print(f"d_in {args.d_in}, n_latents {args.n_latents}, k {args.k}, global batch {args.batch}, "
          f"median of {args.steps} steps")
    print(f"{'mode':<10} {'step s':>8} {'/ single':>9}")
    for mode, t in results.items():
        print(f"{mode:<10} {t:8.3f} {t / base:9.2f}")


if __name__ == "__main__":
    main()
