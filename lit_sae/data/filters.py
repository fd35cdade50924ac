"""Which token rows are kept: the exclusions harvest and the LM stream share (one function, so both keep exactly
the same tokens).

A row (one token's activations at every hook point read) is dropped when, at any hook point,

* it is not finite in the storage dtype (float16 overflows above 65504), or
* its float32 L2 norm exceeds that hook's threshold (``norm_filter_multiple`` x the median norm; a handful of
  attention-sink tokens otherwise dominate the MSE, see docs/recipe.md).

Position 0 of every context is removed before (``drop_first_position``), by the caller's slicing.
"""

from __future__ import annotations

import numpy as np
import torch


def keep_masks(acts: dict[str, torch.Tensor], thresholds: dict[str, float], storage: torch.dtype) \
        -> tuple[np.ndarray, np.ndarray]:
    """``(finite, small)``: bool (N,) masks over rows of float32 (N, d) activations per hook point.

    ``finite``: every hook's row is finite once cast to ``storage``; ``small``: every hook's row norm is at most
    its threshold (``math.inf``: no filter). A row is kept when both hold.
    """
    hooks = list(acts)
    finite = np.logical_and.reduce([torch.isfinite(acts[h].to(storage)).all(dim=1).numpy() for h in hooks])
    small = np.logical_and.reduce([(acts[h].norm(dim=1) <= thresholds[h]).numpy() for h in hooks])
    return finite, small


def norm_threshold(norm_filter_multiple, median) -> float:
    """The norm above which rows are dropped: multiple x median, or inf without a filter."""
    return float("inf") if norm_filter_multiple is None or median is None else norm_filter_multiple * median
