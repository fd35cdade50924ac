"""Train EleutherAI sparsify's ``SparseCoder`` with sparsify's Adam recipe on batches fixed by the caller.

Runs inside a Python environment that has ``eai-sparsify`` (never in lit-sae's own), as a file (it imports nothing
of lit-sae): ``lit_sae.reproduce.compare_sparsify.start_sparsify`` starts it as a subprocess, so that both libraries
see exactly the same batches in the same order. Set ``SPARSIFY_DISABLE_TRITON=1`` on machines without a GPU.

The recipe is the one of sparsify's ``Trainer`` with ``optimizer="adam"`` (sparsify/trainer.py), restated here
because that trainer reads activations from a language model itself:

- ``SparseCoder(d_in, SparseCoderConfig(num_latents=n, k=k))``: the encoder is ``nn.Linear``'s default init
  (rows of norm about 1/sqrt(3) = 0.58), encoder bias 0, W_dec = the encoder's weights with unit rows.
- ``torch.optim.Adam`` at lr 2e-4 / sqrt(n / 2^14) (torch's default betas 0.9/0.999 and eps 1e-8), with
  ``transformers.get_linear_schedule_with_warmup(adam, warmup_steps, total_steps)``: linear warm-up, then linear
  decay to zero at the last step. sparsify's default warm-up is 1000 steps. ``--schedule constant`` instead keeps
  the learning rate constant from the first step (no warm-up, no decay): the same schedule as lit-sae's default, so
  that the two recipes can be compared at equal learning rates.
- b_dec is set to the mean of the first batch; W_dec rows are renormalised before every forward pass; the gradient
  component parallel to each decoder row is removed before every step.
- Loss: FVU (+ ``auxk_alpha`` x AuxK over latents silent for ``dead_feature_threshold`` tokens; sparsify's default
  auxk_alpha is 0: no AuxK) (+ Multi-TopK FVU / 8 when ``--multi-topk``, as sparsify's trainer adds it).

Inputs (``--data``): ``train.npy`` (N, d_in) float16 and ``order.npy`` (steps, batch) int64 row indices. Output:
the trained SAE in sparsify's own folder layout (``save_to_disk``), read back by lit-sae's ``load_sae``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("sparsify_runner")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train.npy and order.npy")
    p.add_argument("--out", required=True, help="folder the trained SparseCoder is saved to (save_to_disk)")
    p.add_argument("--n-latents", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-4 / sqrt(n_latents / 2^14), as sparsify")
    p.add_argument("--warmup-steps", type=int, default=1000, help="sparsify's lr_warmup_steps (default 1000)")
    p.add_argument("--schedule", choices=["linear", "constant"], default="linear",
                   help="linear: sparsify's warm-up then linear decay to 0; constant: lr at every step")
    p.add_argument("--auxk-alpha", type=float, default=0.0, help="sparsify's auxk_alpha (default 0: no AuxK)")
    p.add_argument("--dead-feature-threshold", type=int, default=10_000_000)
    p.add_argument("--multi-topk", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    data = Path(args.data)
    train = np.load(data / "train.npy", mmap_mode="r")
    order = np.load(data / "order.npy")
    steps, _ = order.shape
    torch.manual_seed(args.seed)
    cfg = SparseCoderConfig(num_latents=args.n_latents, k=args.k, multi_topk=args.multi_topk)
    sae = SparseCoder(train.shape[1], cfg, "cpu", dtype=torch.float32)
    lr = args.lr or 2e-4 / math.sqrt(sae.num_latents / 2**14)
    adam = torch.optim.Adam(sae.parameters(), lr=lr)
    if args.schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda step: 1.0)
    else:
        sched = get_linear_schedule_with_warmup(adam, args.warmup_steps, steps)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    log.info(
        "sparsify %d steps, lr %.3g, %s schedule (warm-up %d steps), auxk_alpha %g", steps, lr, args.schedule,
        args.warmup_steps, args.auxk_alpha)
    for step in range(steps):
        x = torch.from_numpy(np.ascontiguousarray(train[np.sort(order[step])])).float()
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > args.dead_feature_threshold if args.auxk_alpha > 0 else None
        out = sae(x, dead_mask=dead)
        loss = out.fvu + args.auxk_alpha * out.auxk_loss
        if args.multi_topk:
            loss = loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        adam.step()
        adam.zero_grad()
        sched.step()
        with torch.no_grad():
            fired = torch.zeros(sae.num_latents, dtype=torch.bool)
            fired[out.latent_indices[out.latent_acts > 0]] = True
            since_fired += x.shape[0]
            since_fired[fired] = 0
        if step % 50 == 0 or step == steps - 1:
            log.info("step %d fvu %.4f", step, float(out.fvu))
    sae.set_decoder_norm_to_unit_norm()
    sae.save_to_disk(args.out)
    Path(args.out, "train_info.json").write_text(json.dumps(
        {"steps": steps, "lr": lr, "schedule": args.schedule, "final_fvu": float(out.fvu)}))


if __name__ == "__main__":
    main()
