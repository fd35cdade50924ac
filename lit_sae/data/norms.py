"""The norm filter's reference: the median activation norm per hook point over the first contexts of a source.

Shared by ``lit-sae harvest`` and the LM stream (``lit_sae.data.lm_stream``): rows that are not finite in the
storage dtype are counted and left out before the median is taken.
"""

from __future__ import annotations

import logging
import math

import torch

from lit_sae.data.contexts import first_position, iter_contexts
from lit_sae.data.lm import truncated_forward, truncated_forward_many
from lit_sae.data.text import ContentHash

__all__ = ["finite_median", "forward_hooks", "norm_medians"]

log = logging.getLogger(__name__)


def forward_hooks(model, input_ids: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """Activations (B, T, d) at each hook from one truncated forward (one hook: :func:`truncated_forward`)."""
    if len(hooks) == 1:
        return {hooks[0]: truncated_forward(model, input_ids, hooks[0])}
    return truncated_forward_many(model, input_ids, hooks)


def norm_medians(model, tokenizer, source, config: dict, device, hooks: list[str]) -> dict[str, float]:
    """Median activation norm per hook over the first ``batch_size`` contexts (all splits), positions kept (the
    norm filter's reference, for harvest and the LM stream). Raises ValueError (no context) or FloatingPointError."""
    contexts = iter_contexts(tokenizer, source.documents(), config["context_length"], config["batch_size"],
                             config["max_contexts_per_document"], ContentHash())
    ids = torch.as_tensor([tokens for _, tokens in contexts], dtype=torch.long)
    if len(ids) == 0:
        raise ValueError(f"text source {config['source']!r} yields no context of {config['context_length']} tokens")
    first = first_position(config["drop_first_position"])
    acts = forward_hooks(model, ids.to(device), hooks)
    return {h: finite_median(a[:, first:].reshape(-1, a.shape[-1]), h, config, len(ids)) for h, a in acts.items()}


def finite_median(rows: torch.Tensor, hook: str, config: dict, n_contexts: int) -> float:
    """The median norm of the rows finite in the storage dtype (the harvest drops the others as non-finite).

    One NaN row would make the median NaN, and every finite row would then fail ``norm <= multiple * NaN`` and be
    dropped as an "outlier"; so non-finite rows are counted and left out first.

    Raises:
        FloatingPointError: no finite row, or a median that is still not finite or not positive (names the key)."""
    storage = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(config["dtype"], torch.float32)
    finite = torch.isfinite(rows.to(storage)).all(dim=-1)
    if not bool(finite.all()):
        log.warning("norm median at %s: %d of %d rows of the first %d contexts are not finite in %s and are left out",
                    hook, int((~finite).sum()), len(rows), n_contexts, config["dtype"])
    median = float(rows[finite].float().norm(dim=-1).median()) if bool(finite.any()) else math.nan
    if not math.isfinite(median) or median <= 0:
        raise FloatingPointError(
            f"norm_filter_multiple: the median activation norm of the first {n_contexts} contexts at {hook} is "
            f"{median} ({int(finite.sum())} of {len(rows)} rows finite in {config['dtype']}): the model's activations "
            "overflow or vanish; use model_dtype float32 (or bfloat16), or norm_filter_multiple: null to harvest "
            "without the norm filter")
    return median
