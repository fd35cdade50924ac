"""Training-step speed and memory of lit-sae's fast TopK path against the dense reference path.

One table: for each configuration (regime, n_latents, k) and each path (naive = dense reference, fast =
lit_sae.sae.kernels), the time of a full training step as ``SAEModule`` runs it (TopKSAE forward + backward, decoder gradient projection, fused Adam,
decoder renormalisation), tokens/s, the step's peak memory above what the model and optimizer already hold, the
time of one bare (B x d_in) x (d_in x n) matmul measured in the same process, and the ratio step / matmul.

Each configuration runs in its own subprocess so that peak memory is that configuration's alone: on CPU the peak
resident set of the timed steps (VmHWM, reset after the warm-up step, which allocates Adam's state) minus the
resident set before them; on CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated before them.

    .venv/bin/python scripts/benchmark.py            # the regimes below, d_in 768, batch 4096, fast path
    .venv/bin/python scripts/benchmark.py --paths naive fast --plan steady:16384:32   # one row, both paths
    .venv/bin/python scripts/benchmark.py --quick    # small and fast: a smoke test of the script itself
    .venv/bin/python scripts/benchmark.py --fit      # also: Lightning fit on synthetic shards vs the bare step

Regimes (``--plan regime:n_latents:k ...``; the default is every regime of the speed targets):
    steady  nothing dead, AuxK off (the common step)
    auxk    AuxK's worst case: half the latents (every other one) dead at every step, k_aux = d_in / 2
    multi   Multi-TopK (top-4k decoded too, the paper's L(4k) / 8 term)

Peak memory of the fast step above weights + Adam state (fp32 parameters): the gradients of W_enc and W_dec,
2 * n * d * 4 (the previous step's are held while the next forward runs), plus one pre-activation chunk
C = min(B, rows_per_chunk) * n * e <= ``kernels.preact_budget(device)`` (e = 4 in fp32, 2 under bf16 autocast), plus
AuxK's copy of the chunk's dead columns (n_dead / n of C), plus the tie repair's (e + 5) / 16 * C where boundary ties
are common (bf16), plus terms in B * (d + k + k_aux) only. The table prints that n-dependent part (``n-part MiB``)
and what is left (``rest MiB``): the rest must not grow with n.

``--fit`` writes synthetic fp16 shards, runs ``Trainer.fit`` (SAEModule + ActivationDataModule, its default single
loader worker) for ``--fit-steps`` steps, and compares its tokens/s (timed after a warm-up) with the bare step rate
of the same model on an in-memory batch, measured in the same process: the data path's cost.

CPU runs in fp32 (``--bf16``: bf16 autocast, as on a CUDA device, where the step and the matmul always run in bf16).
Timings on a shared machine are noisy: the matmul is timed in the same process, right before the steps, so the ratio
is the number to read; the last column is the same ratio in process CPU time (less sensitive to other jobs; on GPU
it means little).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER_EPS = 6.25e-10  # Adam epsilon of OpenAI's training code, as lit_sae.train.module uses


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak_rss() -> None:
    """Give freed heap memory back to the system and restart the kernel's peak-RSS counter (Linux; no-op elsewhere),
    so that the peak read later is this step's, not the warm-up's or memory the allocator kept."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError):
        pass


def _peak_rss_bytes() -> int:
    """Peak resident set since the last ``_reset_peak_rss`` (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _time(fn, device: str, repeats: int, clock=time.perf_counter) -> list[float]:
    """Seconds of each of ``repeats`` calls of fn (after one warm-up call)."""
    fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        _sync(device)
        out.append(clock() - t0)
    return out


REGIMES = ("steady", "auxk", "multi")
# The configurations of the speed targets (regime, n_latents, k): steady state, AuxK's worst case, k = 128,
# Multi-TopK, and wide dictionaries.
ISSUE_PLAN = (
    "steady:16384:32",
    "auxk:16384:32",
    "steady:16384:128",
    "multi:16384:32",
    "steady:65536:32",
    "steady:262144:32",
)


def n_dependent_bytes(B: int, d: int, n: int, elem: int = 4, device: str = "cpu", n_dead: int = 0) -> int:
    """The part of the fast step's peak (above weights and Adam state) that grows with n, in bytes: the fp32
    gradients of W_enc and W_dec (``2 * n * d * 4``; the previous step's are still held while the next forward runs,
    as in Lightning's closure, which zeroes them after the forward), plus one pre-activation chunk of ``elem``-byte
    elements (at most ``kernels.preact_budget(device)`` bytes, ``rows`` of them), plus AuxK's copy of the chunk's
    ``n_dead`` dead columns. Where ties at the top-k boundary are common (bf16, ``elem == 2``) the tie repair's
    copy, mask and int32 counts of at most a sixteenth of the chunk's rows add ``(elem + 5) / 16`` of the chunk;
    in fp32 the repair almost never runs and is not counted."""
    from lit_sae.sae import kernels

    rows = min(B, max(1, kernels.preact_budget(device) // (n * elem)))
    chunk = rows * n * elem
    repair = chunk * (elem + 5) // 16 if elem == 2 else 0
    return 2 * n * d * 4 + chunk + rows * n_dead * elem + repair


def regime_dead_mask(regime: str, n: int) -> torch.Tensor:
    """(n,) bool: the latents a regime's steps treat as dead. Steady and Multi-TopK: none (AuxK off); auxk: its
    worst case, every other latent dead at every step, so each row picks k_aux of them."""
    mask = torch.zeros(n, dtype=torch.bool)
    if regime == "auxk":
        mask[::2] = True
    return mask


def worker(args) -> dict:
    """Time one configuration in this process; returns the row as a dict."""
    from lit_sae.sae.model import TopKSAE

    torch.manual_seed(0)
    dev = args.device
    bf16 = dev == "cuda" or args.bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    B, d, n, k = args.batch, args.d_in, args.n_latents, args.k
    x = (torch.randn(B, d) + 0.3).to(dev)  # activations have a large mean; the SAE's b_pre absorbs it

    from lit_sae.sae import kernels

    if args.preact_mib:
        kernels.MAX_PREACT_BYTES = kernels.MAX_PREACT_BYTES_CUDA = args.preact_mib * 2**20
    # One bare matmul, the unavoidable dense work of a step, in the step's precision. Where the whole (B, n) product
    # would not fit (2 GiB), it runs in row blocks into one reused buffer: the same FLOPs, no allocation timed.
    a, w = torch.randn(B, d, device=dev, dtype=dtype), torch.randn(d, n, device=dev, dtype=dtype)
    rows = max(1, min(B, 2**31 // (n * a.element_size())))
    buf = torch.empty(rows, n, device=dev, dtype=dtype)

    def bare_mm():
        for r0 in range(0, B, rows):
            r1 = min(B, r0 + rows)
            torch.mm(a[r0:r1], w, out=buf[: r1 - r0])

    mm = statistics.median(_time(bare_mm, dev, max(3, args.steps)))
    # Process CPU time as well: on a shared machine wall time swings with the other jobs, CPU time much less.
    mm_cpu = statistics.median(_time(bare_mm, dev, max(3, args.steps), time.process_time))
    a = w = buf = None  # free the operands before the step is timed

    sae = TopKSAE(d, n, k, k_aux=d // 2, multi_topk=args.regime == "multi", fast=args.path == "fast").to(dev)
    fused = dev in ("cpu", "cuda")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=PAPER_EPS, fused=fused)
    dead_mask = regime_dead_mask(args.regime, n).to(dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            out = sae(x, dead_mask)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grads_()
        opt.step()
        sae.normalize_decoder_()
        return out.loss

    # Warm-up step first: Adam's state is allocated there and belongs to the model's memory, not the step's.
    step()
    # The gradients belong to the step's peak (the formula of n_dependent_bytes counts them): drop the warm-up's
    # before the base is read, so that the timed steps allocate them again above it.
    opt.zero_grad(set_to_none=True)
    _sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        # The encoder's reused chunk buffers (``lit_sae.sae.workspace._chunk_buffer``) were allocated by the warm-up step: they are
        # part of the step's memory, so they are added back to the peak measured above this base.
        base = _rss_bytes() - kernels.workspace_bytes()
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if dev == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    step_s = statistics.median(times)
    profile = ""
    if args.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(2):
                step()
            _sync(dev)
        key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        profile = prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)
    n_part = n_dependent_bytes(B, d, n, torch.finfo(dtype).bits // 8, dev, int(dead_mask.sum()))
    return {
        "regime": args.regime,
        "n_latents": n,
        "k": k,
        "path": args.path,
        "device": dev,
        "dtype": str(dtype).replace("torch.", ""),
        "step_ms": step_s * 1e3,
        "tokens_per_s": B / step_s,
        "peak_mib": max(peak, 0) / 2**20,
        "n_part_mib": n_part / 2**20,
        "rest_mib": (max(peak, 0) - n_part) / 2**20,
        "matmul_ms": mm * 1e3,
        "step_over_matmul": step_s / mm,
        "cpu_step_over_matmul": statistics.median(cpu_times) / mm_cpu,
        "loss": float(loss),
        "preact_mib": kernels.preact_budget(dev) / 2**20,
        "kernels": "triton" if kernels._triton.use_triton(x) else "torch",  # LIT_SAE_KERNELS decides (auto: CUDA)
        "profile": profile,
    }


def fit_worker(args) -> dict:
    """End-to-end: Lightning fit on synthetic shards vs the bare training step, in this process."""
    import tempfile

    import lightning as L

    from lit_sae.data.datamodule import ActivationDataModule
    from lit_sae.data.shards import LMInfo, Manifest, ShardInfo, ShardWriter, SplitInfo, write_manifest_atomic
    from lit_sae.train.module import SAEModule

    dev = args.device
    B, d, n, k, steps, warm = args.batch, args.d_in, args.n_latents, args.k, args.fit_steps, args.fit_warmup
    tmp = tempfile.TemporaryDirectory(prefix="lit-sae-bench-")
    # Enough distinct tokens for half the run: the second half re-reads them as a new epoch, as a long fit would.
    n_tok = B * max(8, (steps + warm) // 2)
    g = torch.Generator().manual_seed(0)
    man = Manifest(
        d_in=d,
        dtype="float16",
        block_tokens=4096,
        tokens_per_shard=16 * 4096,
        context_length=64,
        hook_point="synthetic",
        lm=LMInfo(name="synthetic"),
    )
    for split, count in (("train", n_tok), ("val", 4096)):
        infos = []
        with ShardWriter(tmp.name, split, d, "float16", 4096, 16 * 4096, on_shard=infos.append) as w:
            for s0 in range(0, count, 65536):
                m = min(65536, count - s0)
                ids = torch.arange(s0, s0 + m)
                w.add(torch.randn(m, d, generator=g) + 0.3, ids % 50000, ids // 64, ids % 64)
        man.splits[split] = SplitInfo([ShardInfo(**i) for i in infos], contexts=count // 64)
    write_manifest_atomic(tmp.name, man)

    class StepTimer(L.Callback):
        """Wall time from the start of step ``warm`` to the end of the last step."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warm:
                _sync(dev)
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            _sync(dev)
            self.t1 = time.perf_counter()

    torch.manual_seed(0)
    model = SAEModule(d, n_latents=n, k=k, export_dir="none", init_tokens=4096)
    dm = ActivationDataModule(tmp.name, batch_size_tokens=B, num_workers=args.fit_workers)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if dev == "cuda" else "cpu", devices=1, precision="bf16-mixed" if dev == "cuda" else "32-true",
        max_steps=steps + warm, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
        default_root_dir=tmp.name,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    fit_s = (timer.t1 - timer.t0) / steps

    # The bare step of the same (trained) model on one in-memory batch: forward, backward, projection, Adam, renorm.
    sae = model.sae.to(dev)
    opt = torch.optim.Adam(sae.parameters(), lr=model.lr, eps=PAPER_EPS, fused=dev in ("cpu", "cuda"))
    x = (torch.randn(B, d) + 0.3).to(dev)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            out = sae(x, torch.zeros(n, dtype=torch.bool, device=dev))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grads_()
        opt.step()
        sae.normalize_decoder_()

    bare_s = statistics.median(_time(step, dev, max(3, min(steps, 10))))
    tmp.cleanup()
    return {
        "n_latents": n,
        "k": k,
        "steps": steps,
        "fit_tokens_per_s": B / fit_s,
        "bare_tokens_per_s": B / bare_s,
        "data_path_cost": fit_s / bare_s - 1,
    }


def _run_config(args, n: int, k: int, path: str, fit: bool = False, regime: str = "steady") -> dict:
    """One configuration in a fresh subprocess (its own peak memory)."""
    cmd = [
        sys.executable, __file__, "--worker", "--regime", regime, "--device", args.device, "--batch", str(args.batch),
        "--d-in", str(args.d_in), "--n-latents", str(n), "--k", str(k), "--path", path, "--steps", str(args.steps),
        "--fit-steps", str(args.fit_steps), "--fit-warmup", str(args.fit_warmup), "--fit-workers", str(args.fit_workers),
        "--preact-mib", str(args.preact_mib),
    ] + (["--fit"] if fit else []) + (["--profile"] if args.profile else []) + (["--bf16"] if args.bf16 else [])  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark worker {n=} {k=} {path=} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], batch: int, d_in: int) -> str:
    """Markdown table of the rows, with the fast path's speed-up over the naive one."""
    naive = {(r["regime"], r["n_latents"], r["k"]): r["step_ms"] for r in rows if r["path"] == "naive"}
    head = (
        f"batch {batch} tokens, d_in {d_in}, device {rows[0]['device']}, {rows[0]['dtype']}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
        "| regime | n_latents | k | path | step ms | tokens/s | step peak MiB | n-part MiB | rest MiB | matmul ms "
        "| step/matmul | fast speed-up | CPU-time step/matmul |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        ref = naive.get((r["regime"], r["n_latents"], r["k"]))
        speedup = f"{ref / r['step_ms']:.2f}x" if r["path"] == "fast" and ref else ""
        lines.append(
            f"| {r['regime']} | {r['n_latents']} | {r['k']} | {r['path']} | {r['step_ms']:.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['peak_mib']:.0f} | {r['n_part_mib']:.0f} | {r['rest_mib']:.0f} | {r['matmul_ms']:.0f} | {r['step_over_matmul']:.2f} | {speedup} | "
            f"{r['cpu_step_over_matmul']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small run: n 4096, k 32, batch 1024, 2 steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument(
        "--plan",
        nargs="+",
        default=list(ISSUE_PLAN),
        metavar="REGIME:N:K",
        help=f"configurations to time, regime one of {REGIMES} (default: the speed targets' set)",
    )
    p.add_argument("--n-latents", type=int, nargs="+", default=[16384], help="n_latents of the --fit comparison")
    p.add_argument("--k", type=int, nargs="+", default=[32], help="k of the --fit comparison")
    p.add_argument(
        "--paths",
        nargs="+",
        default=["fast"],
        choices=["naive", "fast"],
        help="naive (dense reference) too: slow, and its (B, n) tensors need ~5 GiB at n = 262144",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    p.add_argument("--fit", action="store_true", help="also fit on synthetic shards (first n_latents and k)")
    p.add_argument("--fit-only", action="store_true", help="only the fit comparison, no step table")
    p.add_argument("--fit-steps", type=int, default=200, help="timed fit steps")
    p.add_argument("--fit-warmup", type=int, default=5, help="untimed fit steps first (b_pre init, loader start)")
    p.add_argument("--fit-workers", type=int, default=1, help="DataLoader workers in the fit (0: read in-process)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of two steps per configuration")
    p.add_argument(
        "--preact-mib",
        type=int,
        default=0,
        help="pre-activation chunk budget in MiB (default: lit_sae.sae.kernels.MAX_PREACT_BYTES)",
    )
    p.add_argument(
        "--bf16", action="store_true",
        help="on CPU too: the step under bf16 autocast and the bare matmul in bf16 (AMX where the CPU has it)",
    )
    p.add_argument("--list", action="store_true", help="print the configurations that would run, then exit")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=["naive", "fast"], help=argparse.SUPPRESS)
    p.add_argument("--regime", choices=REGIMES, default="steady", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    plan = []
    for item in args.plan:
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in REGIMES or not (parts[1].isdigit() and parts[2].isdigit()):
            p.error(f"--plan {item!r}: expected REGIME:N_LATENTS:K with REGIME one of {REGIMES}, e.g. auxk:16384:32")
        plan.append((parts[0], int(parts[1]), int(parts[2])))
    if args.worker:
        args.n_latents, args.k = args.n_latents[0], args.k[0]
        print(json.dumps(fit_worker(args) if args.fit else worker(args)))
        return 0
    if args.quick:
        args.n_latents, args.k, args.batch, args.steps = [4096], [32], 1024, 2
        plan = [(r, 4096, 32) for r in REGIMES]
        args.fit_steps = min(args.fit_steps, 20)
    if args.list:
        for regime, n, k in plan:
            elem = 2 if args.device == "cuda" or args.bf16 else 4
            n_dead = int(regime_dead_mask(regime, n).sum())
            mib = n_dependent_bytes(args.batch, args.d_in, n, elem, args.device, n_dead) / 2**20
            print(f"{regime} n_latents={n} k={k} batch={args.batch} paths={args.paths} n-part {mib:,.0f} MiB")
        return 0
    rows = []
    if not args.fit_only:
        for regime, n, k in plan:
            for path in args.paths:
                try:
                    row = _run_config(args, n, k, path, regime=regime)
                except RuntimeError as e:  # one configuration that fails (e.g. out of memory) does not stop the rest
                    print(f"FAILED {regime} n={n} k={k} {path}: {str(e)[-600:]}", file=sys.stderr, flush=True)
                    continue
                rows.append(row)
                print(
                    f"done {regime} n={n} k={k} {path}: {row['step_ms']:.0f} ms, step/matmul "
                    f"{row['step_over_matmul']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
                if row.get("profile"):
                    print(f"profile of {regime} n={n} k={k} {path}:\n{row['profile']}", file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
        if rows:
            print(format_table(rows, args.batch, args.d_in))
    if args.fit or args.fit_only:
        fit = _run_config(args, args.n_latents[0], args.k[0], "fast", fit=True)
        print(
            f"\nfit on shards (fast path, n_latents {fit['n_latents']}, k {fit['k']}, {fit['steps']} timed steps): "
            f"{fit['fit_tokens_per_s']:,.0f} tokens/s end-to-end vs {fit['bare_tokens_per_s']:,.0f} bare step: "
            f"data path + Lightning cost {100 * fit['data_path_cost']:+.1f}%"
        )
        rows.append({"fit": fit})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
