"""Small synthetic shard sets for tests (shared test helper): the activations are the caller's, the rest is fixed.

Token i of the set (numbered across splits in the order given) has context i // ctx_len and position i % ctx_len, so
``ctx * ctx_len + pos`` names a token in every batch, and token id i % 1000. Written with lit-sae's public writer
(``ShardWriter``, ``write_manifest_atomic``), as a harvest would.
"""

from pathlib import Path

import torch

from lit_sae.data.shards import FORMAT, ShardWriter, write_manifest_atomic

CTX_LEN = 16


def write_shards(out, acts: dict[str, torch.Tensor], *, ctx_len: int = CTX_LEN, dtype: str = "float16",
                 block_tokens: int = 64, tokens_per_shard: int = 256, hook_point: str = "blocks.0.hook_resid_post",
                 lm_name: str = "synthetic-lm") -> dict:
    """Write ``acts[split]`` (n, d_in) of every split into ``out`` with a complete manifest; returns the manifest."""
    out = Path(out)
    d_in = next(iter(acts.values())).shape[1]
    man = {"format": FORMAT, "d_in": d_in, "dtype": dtype, "block_tokens": block_tokens,
           "tokens_per_shard": tokens_per_shard, "context_length": ctx_len, "hook_point": hook_point,
           "lm": {"name": lm_name}, "splits": {}, "complete": True}
    start = 0
    for split, a in acts.items():
        n = a.shape[0]
        infos: list = []
        ids = torch.arange(start, start + n)
        with ShardWriter(str(out), split, d_in, dtype, block_tokens, tokens_per_shard, on_shard=infos.append) as w:
            w.add(a, ids % 1000, ids // ctx_len, ids % ctx_len)
        start += n
        man["splits"][split] = {"shards": infos, "tokens": n, "contexts": (n + ctx_len - 1) // ctx_len}
    write_manifest_atomic(str(out), man)
    return man


def token_ids(batch: dict, ctx_len: int = CTX_LEN) -> list[int]:
    """Global token numbers of a batch (the inverse of write_shards' ctx / pos)."""
    return (batch["ctx"] * ctx_len + batch["pos"]).tolist()
