"""Cost of N SAEs in one sweep against N separate runs, measured as ratios in one process.

A step of ``SAESweepModule`` with N SAEs (each SAE's forward + backward, decoder gradient projection, one fused Adam
over all parameter groups, decoder renormalisation) is timed against the same step with one SAE; both on an
in-memory batch, alternating rounds so that the machine's load hits both alike (medians). The data read of one batch
from synthetic fp16 shards (``ActivationDataModule``, in-process) is timed in the same process.

    one sweep step     = T_N          bound: T_N <= N * T_1 * 1.05   (the issue's target)
    a sweep's step     = T_N + T_read      N separate runs' steps = N * (T_1 + T_read)

    .venv/bin/python -m scripts.bench_sweep                 # d_in 256, n 2048, k 32, batch 1024, N 4
    .venv/bin/python -m scripts.bench_sweep --quick         # smoke test of the script

Prints one JSON line. On a shared machine absolute times mean little: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support.faults, when run as a script

from lit_sae.train.sweep import SAESweepModule


def step_fn(module: SAESweepModule, x: torch.Tensor):
    """The compute of ``SAESweepModule.training_step`` + its optimizer hooks, without a Trainer."""
    opt = module.configure_optimizers()
    dead = {name: torch.zeros(m.sae.n_latents, dtype=torch.bool) for name, m in module.members.items()}

    def step() -> None:
        total = x.new_zeros(())
        for name, member in module.members.items():
            out = member.sae(x, dead[name])
            module._count_fired_(member, out.latent_values.detach(), out.latent_indices)
            total = total + out.loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        for member in module.members.values():
            member.sae.remove_parallel_grads_()
        opt.step()
        for member in module.members.values():
            member.sae.normalize_decoder_()

    return step


def time_read(d_in: int, batch: int, n_batches: int) -> float:
    """Median seconds to read one batch from fp16 shards (in-process loader)."""
    from lit_sae.data.datamodule import ActivationDataModule
    from tests.support.faults import make_shards

    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp) / "shards", n_train=batch * (n_batches + 2), n_val=batch, d_in=d_in)
        dm = ActivationDataModule(str(shards), batch_size_tokens=batch, shuffle_buffer_tokens=batch * 2,
                                  num_workers=0)
        dm.setup("fit")
        times, it = [], iter(dm.train_dataloader())
        next(it)
        for _ in range(n_batches):
            t = time.perf_counter()
            next(it)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--n-latents", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--n-saes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.d_in, a.n_latents, a.k, a.batch, a.n_saes, a.rounds = 32, 256, 8, 256, 3, 2
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.d_in)
    spec = {"n_latents": a.n_latents, "k": a.k, "lr": 1e-4}
    one = SAESweepModule(a.d_in, saes=[{"name": "s0"}], defaults=spec)
    many = SAESweepModule(a.d_in, saes=[{"name": f"s{i}"} for i in range(a.n_saes)], defaults=spec)
    step1, stepN = step_fn(one, x), step_fn(many, x)
    step1(), stepN()  # warm-up (allocations, fused Adam state)
    t1, tN = [], []
    for _ in range(a.rounds):  # alternate so that load changes hit both
        t = time.perf_counter()
        step1()
        t1.append(time.perf_counter() - t)
        t = time.perf_counter()
        stepN()
        tN.append(time.perf_counter() - t)
    T1, TN = statistics.median(t1), statistics.median(tN)
    Tread = time_read(a.d_in, a.batch, max(a.rounds, 3))
    result = {"d_in": a.d_in, "n_latents": a.n_latents, "k": a.k, "batch": a.batch, "n_saes": a.n_saes,
              "sweep_step_over_n_single_steps": TN / (a.n_saes * T1),
              "bound": 1.05, "within_bound": TN <= 1.05 * a.n_saes * T1,
              "read_over_single_step": Tread / T1,
              "sweep_over_separate_runs": (TN + Tread) / (a.n_saes * (T1 + Tread)),
              "threads": torch.get_num_threads()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
