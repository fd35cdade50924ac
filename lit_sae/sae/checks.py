"""Input checks shared by the public entry points: shape and dtype, before any state is touched.

Every function raises ``ValueError`` naming the argument, the shape or dtype it got and the one it expects, so a
wrong tensor fails at the door instead of deep inside a kernel (or, worse, after a buffer, threshold or counter was
already updated). They read only ``.shape`` / ``.dtype`` / ``.ndim``: no device synchronisation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_acts", "check_code", "check_mask", "check_same_shape", "check_token_ids", "check_probe_data"]


def _tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_acts(x, d_in: int, name: str = "x") -> Tensor:
    """``x`` must be a floating (B, d_in) tensor; returns it unchanged.

    Raises:
        ValueError: not a tensor, not 2-D, last dimension != d_in, or an integer / bool dtype."""
    x = _tensor(x, name)
    if x.ndim != 2 or x.shape[1] != d_in:
        hint = " (flatten batch and sequence dimensions first: x.reshape(-1, d_in))" if x.ndim > 2 else ""
        raise ValueError(f"{name}: expected shape (B, {d_in}) = (tokens, d_in), got {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype (float32, bfloat16, float16), got {x.dtype}")
    return x


def check_code(values, indices, n_latents: Optional[int] = None, name: str = "latent") -> None:
    """A sparse code: ``values`` floating (B, k), ``indices`` integer (B, k) of the same shape.

    Raises:
        ValueError: wrong rank, mismatched shapes, or wrong dtypes."""
    values, indices = _tensor(values, f"{name}_values"), _tensor(indices, f"{name}_indices")
    if values.ndim != 2 or indices.shape != values.shape:
        raise ValueError(f"{name}_values and {name}_indices: expected the same shape (B, k), got "
                         f"{tuple(values.shape)} and {tuple(indices.shape)}")
    if not values.is_floating_point():
        raise ValueError(f"{name}_values: expected a floating dtype, got {values.dtype}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}_indices: expected int64 latent indices in [0, {n_latents or 'n_latents'}), "
                         f"got {indices.dtype}")


def check_mask(mask, n_latents: int, name: str = "dead_mask") -> None:
    """``mask`` must be a bool (n_latents,) tensor.

    Raises:
        ValueError: other shape or dtype."""
    mask = _tensor(mask, name)
    if mask.shape != (n_latents,) or mask.dtype != torch.bool:
        raise ValueError(f"{name}: expected a bool tensor of shape ({n_latents},), got {mask.dtype} "
                         f"{tuple(mask.shape)}")


def check_same_shape(x, x_hat, d_in: Optional[int] = None, names: tuple[str, str] = ("x", "x_hat")) -> None:
    """``x`` and ``x_hat`` must be floating (B, d_in) tensors of one shape (``d_in`` checked when given).

    Raises:
        ValueError: mismatched shapes, wrong rank or width, or non-floating dtypes."""
    x, x_hat = _tensor(x, names[0]), _tensor(x_hat, names[1])
    width = d_in if d_in is not None else (x.shape[-1] if x.ndim else 0)
    check_acts(x, width, names[0])
    if x_hat.shape != x.shape:
        raise ValueError(f"{names[1]}: expected the shape of {names[0]} {tuple(x.shape)}, got {tuple(x_hat.shape)}")
    check_acts(x_hat, width, names[1])


def check_token_ids(input_ids, name: str = "input_ids") -> Tensor:
    """``input_ids`` must be an integer (n_contexts, T) tensor with at least one context; returns it.

    Raises:
        ValueError: wrong rank, no context, or a floating dtype."""
    input_ids = _tensor(input_ids, name)
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"{name}: expected token ids of shape (n_contexts, T) with n_contexts >= 1, got "
                         f"{tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer token ids (int64), got {input_ids.dtype}")
    return input_ids


def check_probe_data(data, name: str = "data") -> None:
    """A probe dataset: ``acts`` floating (N, d_in), ``labels`` (N, n_tasks), ``context`` (N,), one N.

    Raises:
        ValueError: a missing key, a wrong rank, or row counts that differ."""
    if not isinstance(data, dict) or not {"acts", "labels", "context"} <= set(data):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{name}: expected a dict with acts (N, d_in), labels (N, n_tasks) and context (N,) "
                         f"(from probe_dataset), got {got}")
    acts, labels, ctx = (_tensor(data[k], f"{name}[{k!r}]") for k in ("acts", "labels", "context"))
    check_acts(acts, acts.shape[-1] if acts.ndim else -1, f"{name}['acts']")
    n = acts.shape[0]
    if labels.ndim != 2 or labels.shape[0] != n or ctx.shape != (n,):
        raise ValueError(f"{name}: expected labels ({n}, n_tasks) and context ({n},) to match acts ({n}, d_in), got "
                         f"labels {tuple(labels.shape)} and context {tuple(ctx.shape)}")
