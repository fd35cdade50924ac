"""Per-device memory of a TopK SAE training step (``lit_sae.parallel.memory``), and its check against measurement.

    .venv/bin/python scripts/plan_memory.py --d-in 4096 --n-latents 16777216 --k 32 --batch 131072 \
        --data 8 --tensor 8 --compute-dtype bfloat16          # print the plan, per device, in GiB
    .venv/bin/python scripts/plan_memory.py --gpus 80          # tensor-parallel size a 16M x 4096 SAE needs on 80 GB
    .venv/bin/python scripts/plan_memory.py --validate         # predicted vs measured peak on this CPU (1 and 2 ranks)

``--validate`` runs 3 training steps (fp32, fast kernels, Adam, AuxK with 10% dead latents) per case in fresh
processes and compares the model's peak with the measured one: peak resident set (``ru_maxrss``) minus the resident
set just before the SAE is built, after a tiny warm-up step (the runtime's first-use buffers are not the SAE's).
Exit status 1 if any case is off by more than 15%.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_sae.parallel.memory import gpus_needed, plan_memory  # noqa: E402

GiB = 2**30
CASES = [  # (d_in, n_latents, k, global batch, tensor-parallel size)
    (256, 32768, 32, 2048, 1),
    (512, 16384, 32, 4096, 1),
    (256, 65536, 64, 1024, 1),
    (256, 65536, 32, 2048, 2),
]

_STEP = r"""
import json, os, resource, sys, torch
torch.set_num_threads(1)
d, n, k, b, tp = map(int, sys.argv[1:6])
if tp > 1:
    import torch.distributed as dist
    dist.init_process_group("gloo")
from lit_sae.sae.model import TopKSAE
from lit_sae.parallel.tensor import ShardedTopKSAE
x = torch.randn(b, d) + 0.5
dead_all = torch.rand(n) < 0.1
# Warm the runtime up first (BLAS buffers, autograd, fused Adam, gloo): its first-use allocations are not the SAE's.
tiny = TopKSAE(d, 64, min(k, 16))
opt = torch.optim.Adam(tiny.parameters(), fused=True)
tiny(x[:64], torch.rand(64) < 0.5).loss.backward()
opt.step()
if tp > 1:
    dist.all_reduce(torch.zeros(8))
del tiny, opt
rss0 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
if tp > 1:
    sae = ShardedTopKSAE(d, n, k, tp_group=dist.group.WORLD)
    dead = dead_all[sae.local_rows()]
else:
    sae, dead = TopKSAE(d, n, k), dead_all
opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
for _ in range(3):
    out = sae(x, dead)
    out.loss.backward()
    sae.remove_parallel_grads_()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.normalize_decoder_()
    del out
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": peak - rss0}))
"""


def _measure(d: int, n: int, k: int, b: int, tp: int) -> int:
    """Largest measured step peak over the ranks of one case (fresh processes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if tp == 1:
        procs = [subprocess.Popen([sys.executable, "-c", _STEP, str(d), str(n), str(k), str(b), "1"], env=env,
                                  stdout=subprocess.PIPE, text=True)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, "-c", _STEP, str(d), str(n), str(k), str(b), str(tp)],
                                  env=env | dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                                                 WORLD_SIZE=str(tp)), stdout=subprocess.PIPE, text=True)
                 for r in range(tp)]
    peaks = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(f"measurement of {(d, n, k, b, tp)} failed (exit {p.returncode})")
        peaks.append(json.loads(out.strip().splitlines()[-1])["measured"])
    return max(peaks)


def validate() -> int:
    print(f"{'d_in':>5} {'n_latents':>9} {'k':>3} {'batch':>6} {'T':>2} {'predicted MiB':>13} {'measured MiB':>12} "
          f"{'error':>6}")
    worst = 0.0
    for d, n, k, b, tp in CASES:
        predicted = plan_memory(d, n, k, b, tensor_parallel_size=tp, dead_fraction=0.1).peak
        measured = _measure(d, n, k, b, tp)
        err = predicted / measured - 1
        worst = max(worst, abs(err))
        print(f"{d:5d} {n:9d} {k:3d} {b:6d} {tp:2d} {predicted / 2**20:13.1f} {measured / 2**20:12.1f} {err:+6.1%}")
    print(f"worst error {worst:.1%} (limit 15%)")
    return 0 if worst <= 0.15 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=4096)
    p.add_argument("--n-latents", type=int, default=2**24)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=131072, help="global tokens per step")
    p.add_argument("--data", type=int, default=1, help="data-parallel size")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--compute-dtype", default="float32")
    p.add_argument("--multi-topk", action="store_true")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda",
                   help="the pre-activation chunk budget of this device type (kernels.preact_budget)")
    p.add_argument("--gpus", type=float, help="print the tensor-parallel size that fits a device of this many GB")
    p.add_argument("--validate", action="store_true")
    a = p.parse_args()
    if a.validate:
        return validate()
    kw = dict(param_dtype=a.param_dtype, compute_dtype=a.compute_dtype, multi_topk_factor=4 if a.multi_topk else 1,
              ema=a.ema, device=a.device)
    if a.gpus:
        per_rank = a.batch // a.data
        T = gpus_needed(a.d_in, a.n_latents, a.k, per_rank, int(a.gpus * 1e9), **kw)
        print(f"tensor-parallel size {T} ({T} x {a.gpus:g} GB devices per data-parallel replica, {per_rank} tokens "
              f"per replica)")
        a.tensor, a.batch = T, per_rank * a.data
    plan = plan_memory(a.d_in, a.n_latents, a.k, a.batch, data_parallel_size=a.data, tensor_parallel_size=a.tensor,
                       **kw)
    print(f"per device ({a.data} x {a.tensor} mesh), GiB:")
    for key, value in plan.as_dict().items():
        print(f"  {key:<10} {value / GiB:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
