"""Training throughput on the LM stream against replaying shards of the same tokens, in one run.

    .venv/bin/python scripts/bench_stream.py                          # embedded default, 24,576 train tokens
    .venv/bin/python scripts/bench_stream.py --tokens 50000 --n_latents 4096

Both loops run the same SAE training step (TopK SAE, Adam) on the same batches: the stream
(:class:`lit_sae.data.lm_stream.LMStreamDataModule`, the LM in the training process) and the shards a harvest with
the same settings wrote (:class:`lit_sae.data.datamodule.ActivationDataModule`, the same mixing window, one train
shard so the order is identical). Reports tokens/s of each and their ratio (measured in the same run; the machine's
speed varies), the LM's share of the streamed step (time inside the LM forward / streamed wall time), and the
mixing buffer's memory (its formula, and the peak of numpy allocations while streaming, from tracemalloc).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import tracemalloc

import torch

from lit_sae.data import harvest as harvest_mod
from lit_sae.data.datamodule import ActivationDataModule
from lit_sae.data.lm_stream import LMStreamDataModule
from lit_sae.data.lm_stream import rows as rows_mod
from lit_sae.sae.model import TopKSAE


def train_loop(batches, d_in: int, args) -> tuple[int, float]:
    """Run the SAE step on every batch; (tokens, seconds) including the time to produce the batches."""
    torch.manual_seed(0)
    sae = TopKSAE(d_in, args.n_latents, args.k)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    tokens, t = 0, time.perf_counter()
    for batch in batches:
        out = sae(batch["acts"].float())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch["acts"].shape[0]
    return tokens, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--hook_point", default="blocks.20.hook_resid_post")
    parser.add_argument("--source", default="stdlib")
    parser.add_argument("--tokens", type=int, default=24576, help="train tokens per run (before filters)")
    parser.add_argument("--batch_size_tokens", type=int, default=4096)
    parser.add_argument("--shuffle_buffer_tokens", type=int, default=8192)
    parser.add_argument("--n_latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = dict(model=args.model, hook_point=args.hook_point, source=args.source, total_tokens=args.tokens,
                    context_length=64, batch_size=64, max_contexts_per_document=8, val_fraction=0.0,
                    test_fraction=0.0, seed=0)
    batching = dict(batch_size_tokens=args.batch_size_tokens, shuffle_buffer_tokens=args.shuffle_buffer_tokens)
    stream = LMStreamDataModule(**settings, **batching)

    lm_time = []
    real_forward = harvest_mod.forward_hooks

    def timed_forward(*a, **kw):
        t = time.perf_counter()
        out = real_forward(*a, **kw)
        lm_time.append(time.perf_counter() - t)
        return out

    rows_mod.forward_hooks = timed_forward  # the LM forward the stream calls
    tracemalloc.start()
    s_tokens, s_time = train_loop(stream.train_dataloader(), stream.d_in, args)
    _, numpy_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rows_mod.forward_hooks = real_forward

    with tempfile.TemporaryDirectory() as out:
        harvest_mod.load_lm = lambda *a, **kw: (stream.lm, stream.tokenizer)  # reuse the loaded model
        harvest_mod.run_harvest(out_dir=out, block_tokens=4096, tokens_per_shard=1 << 24, progress=False, **settings)
        shards = ActivationDataModule(out, num_workers=0, seed=0, **batching)
        first = list(shards.train_dataloader())  # the page cache is warm for the timed pass, as in a real epoch
        r_tokens, r_time = train_loop(shards.train_dataloader(), shards.d_in, args)
    same = len(first) * args.batch_size_tokens == s_tokens
    n_hooks = len(stream.hooks)
    print(json.dumps({
        "model": args.model, "hook_point": args.hook_point, "d_in": stream.d_in, "n_latents": args.n_latents,
        "threads": torch.get_num_threads(),
        "stream_tokens": s_tokens, "stream_tok_s": round(s_tokens / s_time, 1),
        "shards_tokens": r_tokens, "shards_tok_s": round(r_tokens / r_time, 1),
        "shards_over_stream": round((r_tokens / r_time) / (s_tokens / s_time), 2),
        "same_token_count": same,
        "lm_share_of_streamed_step": round(sum(lm_time) / s_time, 3),
        "mixing_buffer_bytes_formula": args.shuffle_buffer_tokens * stream.d_in * 2 * n_hooks,
        "numpy_peak_bytes_while_streaming": numpy_peak,
    }, indent=1))


if __name__ == "__main__":
    main()
