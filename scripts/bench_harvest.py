"""Harvest throughput against the bare truncated model forward on the same batches (target >= 90%).

    .venv/bin/python scripts/bench_harvest.py                       # embedded default, 8 batches of 64 x 64 tokens
    .venv/bin/python scripts/bench_harvest.py --batches 4 --repeats 1

Also compares the two ways of stopping the forward pass at the hook (an exception raised from a forward hook, as
lit_sae.data.lm.truncated_forward does, versus temporarily truncating the layer list) and the full forward, and
checks that all give the same activations. Runs are interleaved (bare, harvest, bare, harvest, ...) and the best
of each is reported, because other processes on a shared machine add noise. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import numpy as np
import torch

from lit_sae.data import harvest as harvest_mod
from lit_sae.data.lm import decoder_layers, load_lm, resolve_hook, truncated_forward
from lit_sae.data.text import ContentHash, open_source


def layer_list_forward(model, input_ids: torch.Tensor, hook_point: str) -> torch.Tensor:
    """The alternative to truncated_forward: run a model whose layer list is cut after the hook's layer."""
    module, index = resolve_hook(model, hook_point)
    base = model.base_model
    name = next(n for n in ("layers", "h") if getattr(base, n, None) is decoder_layers(model))
    full = getattr(base, name)
    captured = []
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
    setattr(base, name, full[: index + 1])
    try:
        base(input_ids=input_ids, use_cache=False)
    finally:
        setattr(base, name, full)
        handle.remove()
    return captured[0]


def full_forward(model, input_ids: torch.Tensor, hook_point: str) -> torch.Tensor:
    """All layers and the LM head (what a harvest without truncation would cost)."""
    module, _ = resolve_hook(model, hook_point)
    captured = []
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        handle.remove()
    return captured[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hook-point", default="blocks.20.hook_resid_post")
    p.add_argument("--source", default="stdlib")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--context-length", type=int, default=64)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-alternatives", action="store_true", help="only bare forward vs harvest")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model, tokenizer = load_lm(args.model)
    L, B = args.context_length, args.batch_size
    n_contexts = B * args.batches
    # The same contexts, in the same batches, as the harvest below (val/test fractions 0: one split, one pass).
    contexts = harvest_mod.iter_contexts(tokenizer, open_source(args.source, shuffle_seed=0).documents(), L,
                                         n_contexts, None, ContentHash())
    ids = torch.tensor([t for _, t in contexts], dtype=torch.long)
    batches = list(ids.split(B))
    positions = len(ids) * (L - 1)  # stored positions (first dropped), before the norm filter

    def timed_forward(fn) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                fn(model, b, args.hook_point)
        return time.perf_counter() - t

    with torch.inference_mode():  # correctness of the alternatives on the first batch
        ref = truncated_forward(model, batches[0], args.hook_point)
        same_layer_list = torch.equal(ref, layer_list_forward(model, batches[0], args.hook_point))
        full_max_diff = float((ref - full_forward(model, batches[0], args.hook_point)).abs().max())

    median_time = []
    forward_time = []  # time spent inside the model forward during a harvest (median batch excluded)
    real_median = harvest_mod._norm_median

    def timed_median(*a, **kw):
        t = time.perf_counter()
        n = len(forward_time)
        out = real_median(*a, **kw)
        median_time.append(time.perf_counter() - t)
        del forward_time[n:]  # the median batch is a one-time cost, reported separately
        return out

    harvest_mod._norm_median = timed_median

    def timed_truncated(*a, **kw):
        t = time.perf_counter()
        out = truncated_forward(*a, **kw)
        forward_time.append(time.perf_counter() - t)
        return out

    harvest_mod.truncated_forward = timed_truncated
    harvest_mod.load_lm = lambda *a, **kw: (model, tokenizer)  # time the harvest, not the model load

    def timed_harvest() -> tuple[float, float, dict]:
        with tempfile.TemporaryDirectory() as out:
            forward_time.clear()
            t = time.perf_counter()
            manifest = harvest_mod.run_harvest(
                out_dir=out, model=args.model, hook_point=args.hook_point, source=args.source,
                total_tokens=positions, context_length=L, batch_size=B, val_fraction=0.0, test_fraction=0.0,
                max_contexts_per_document=None, shuffle_documents=True, seed=0, progress=False,
                tokens_per_shard=16 * 4096)
            total = time.perf_counter() - t
        steady = total - median_time[-1]
        shares.append(sum(forward_time) / steady)
        return total, steady, manifest

    bare, harvest, harvest_e2e, layer_list, full, shares = [], [], [], [], [], []
    manifest = None
    for _ in range(args.repeats):
        bare.append(timed_forward(truncated_forward))
        e2e, steady, manifest = timed_harvest()
        harvest.append(steady)
        harvest_e2e.append(e2e)
        if not args.skip_alternatives:
            layer_list.append(timed_forward(layer_list_forward))
    if not args.skip_alternatives:
        full.append(timed_forward(full_forward))

    def rate(times):
        return round(positions / min(times), 1) if times else None

    result = {
        "model": args.model, "hook_point": args.hook_point, "batch": [B, L], "batches": len(batches),
        "positions": positions, "stored_tokens": manifest["tokens"], "threads": torch.get_num_threads(),
        "bare_truncated_forward_tok_s": rate(bare),
        "harvest_tok_s": rate(harvest),
        "harvest_vs_bare": round(min(bare) / min(harvest), 3),
        "harvest_tok_s_incl_median_batch": rate(harvest_e2e),
        # Same-run measure, insensitive to load changes between runs: share of the harvest's time in the forward.
        "harvest_forward_share": [round(x, 4) for x in shares],
        "layer_list_truncation_tok_s": rate(layer_list),
        "layer_list_equal_to_truncated_forward": same_layer_list,
        "full_forward_tok_s": rate(full),
        "full_forward_max_abs_diff_at_hook": full_max_diff,
        "runs_s": {"bare": [round(t, 2) for t in bare], "harvest": [round(t, 2) for t in harvest],
                   "layer_list": [round(t, 2) for t in layer_list], "full": [round(t, 2) for t in full]},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
