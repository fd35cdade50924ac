"""What a training batch holds: the activations (``batch_acts``) and a transcoder's target (``batch_target``), read
from the DataModules' dict batches or a bare tensor."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor


def batch_acts(batch: Any) -> Tensor:
    """The activations of a batch: a dict with ``acts`` (from the DataModules) or a bare (B, d_in) tensor."""
    return batch["acts"] if isinstance(batch, dict) else batch


def batch_target(batch: Any, hook_point: Optional[str]) -> Tensor:
    """A transcoder's target of a batch: ``batch["target"]`` (the DataModules' ``data.target_hook_point``).

    Raises ValueError naming data.target_hook_point when the batch has none."""
    if not isinstance(batch, dict) or "target" not in batch:
        raise ValueError("model.transcoder=true needs target activations in every batch: set data.target_hook_point "
                         f"(e.g. {hook_point or 'blocks.L.hook_mlp_out'}) on a multi-hook harvest")
    return batch["target"]
