"""Compare lit-sae's training recipe with EleutherAI sparsify's on the same activations, batch for batch.

The command over ``lit_sae.reproduce.compare`` (data, lit-sae's side, scoring) and
``lit_sae.reproduce.compare_sparsify`` (sparsify's side, presets, tables); see docs/recipe.md for what it measured.

    # the equal-LR race and each side's best LR: both sides at a constant lr, four lrs, two seeds
    python scripts/compare_recipes.py --shards runs/demo/shards --work runs/compare --held-out test val \\
        --tokens 798720 --seeds 0 1 --sparsify-python <sparsify venv>/bin/python --sparsify-args constant \\
        --lrs 2e-4,4e-4,8e-4,1.6e-3 --results runs/compare/results.jsonl
    python scripts/compare_recipes.py --shards runs/demo/shards --work runs/compare \\
        --results runs/compare/results.jsonl --sparsify-args constant --summary
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from lit_sae.reproduce import compare as cmp
from lit_sae.reproduce import compare_sparsify as csp


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="a harvest folder (manifest.json + shards)")
    p.add_argument("--work", required=True, help="folder for the materialised splits, batch orders and SAEs")
    p.add_argument("--tokens", type=int, default=800_000, help="training tokens of each side")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step (both sides)")
    p.add_argument("--n-latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--max-train-tokens", type=int, default=None, help="read at most this many train-split rows")
    p.add_argument("--held-out", nargs="+", default=["test"],
                   help="splits never trained on, scored as the test set (a small harvest: test val)")
    p.add_argument("--lit", nargs="*", default=[], help="SAEModule overrides of quickstart's model settings, KEY=VALUE")
    p.add_argument("--name", default=None, help="a name for this lit-sae variant in the output")
    p.add_argument("--lrs", default=None, help="an LR sweep, both sides at each lr, e.g. 2e-4,4e-4,8e-4,1.6e-3")
    p.add_argument("--sparsify-python", default=None, help="a Python with eai-sparsify; omit to train lit-sae only")
    p.add_argument("--sparsify-args", default="",
                   help=f"a preset ({', '.join(csp.PRESETS)}: see lit_sae.reproduce.compare_sparsify) or runner "
                        "arguments, e.g. '--warmup-steps 20'")
    p.add_argument("--delta-ce-contexts", type=int, default=0, help="test contexts for delta CE (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side (the two sides run in parallel)")
    p.add_argument("--results", default=None, help="append one JSON line per run to this file")
    p.add_argument("--summary", action="store_true", help="print the tables of --results and exit (no training)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        lrs = csp.parse_lrs(args.lrs)
        overrides = cmp.parse_overrides(args.lit)
    except ValueError as exn:
        p.error(str(exn))
    if args.summary:
        rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
        sys.stdout.write(csp.summarize(rows, args.sparsify_args) + "\n\n")
        sys.stdout.write(csp.summarize_lr_sweep(rows, args.sparsify_args) + "\n")
        return rows
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train, test = cmp.prepare_data(args.shards, work, args.max_train_tokens, held_out=tuple(args.held_out))
    base = {**cmp.quickstart_model_settings(), **overrides, "n_latents": args.n_latents, "k": args.k}
    dce = cmp.DeltaCE(args.shards, args.delta_ce_contexts) if args.delta_ce_contexts else None
    results = []
    for lr in lrs:
        settings = base if lr is None else {**base, "lr": lr}
        for seed in args.seeds:
            results.append(run_one(args, work, train, test, settings, lr, seed, dce))
    return results


def run_one(args, work: Path, train, test, settings: dict, lr: Optional[float], seed: int, dce) -> dict[str, Any]:
    """Both sides on one seed's batches (sparsify in a subprocess, in parallel); one result row, also appended to
    ``--results``."""
    order = cmp.batch_order(len(train), args.batch_size, args.tokens, seed)
    run_dir = work / f"b{args.batch_size}_t{args.tokens}_s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / "order.npy", order)
    link = run_dir / "train.npy"
    if not link.exists():
        link.symlink_to((work / "train.npy").resolve())
    sp_args = csp.sparsify_args(args.sparsify_args, len(order), lr)
    sp_out = run_dir / ("sparsify_" + "_".join(sp_args).replace("-", "").replace(".", "p"))
    proc = None
    if args.sparsify_python and not (sp_out / "sae.safetensors").exists():
        proc = csp.start_sparsify(args.sparsify_python, run_dir, sp_out, args.n_latents, args.k, seed, sp_args,
                                  args.threads)
    name = args.name or " ".join(args.lit) or "quickstart"
    row = {"name": name if lr is None else f"{name} lr={lr:g}", "lit": cmp.parse_overrides(args.lit), "lr": lr,
           "seed": seed, "tokens": args.tokens, "batch_size": args.batch_size, "sparsify_args": args.sparsify_args}
    t0 = time.perf_counter()
    sae = cmp.train_lit_sae(train, order, settings, seed)
    row["lit_s"] = time.perf_counter() - t0
    row.update({f"lit_{k}": v for k, v in cmp.test_metrics(sae, test).items()})
    if dce is not None:
        row["lit_delta_ce"] = dce(sae)
    if args.sparsify_python:
        sp = csp.finish_sparsify(proc, sp_out)
        row.update({f"sparsify_{k}": v for k, v in cmp.test_metrics(sp, test).items()})
        row["ratio"] = row["lit_nmse"] / row["sparsify_nmse"]
        if dce is not None:
            row["sparsify_delta_ce"] = dce(sp)
    line = json.dumps(row)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if args.results:
        with open(args.results, "a") as f:
            f.write(line + "\n")
    return row


if __name__ == "__main__":
    main()
