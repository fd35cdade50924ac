"""Which kernels the fast TopK path runs: PyTorch's own operators or lit-sae's Triton kernels.

The setting is ``LIT_SAE_KERNELS`` (environment) or ``set_mode`` (this process; it wins over the environment):

    auto    (default) Triton kernels for CUDA tensors when ``triton`` imports; PyTorch everywhere else, so CPU
            training never needs or loads Triton.
    torch   PyTorch's operators everywhere (the path of earlier releases; ``torch.topk`` + tie repair,
            ``embedding_bag``).
    triton  Triton kernels wherever they apply, CPU tensors included, which only the Triton interpreter can run
            (``TRITON_INTERPRET=1`` set before this package's kernels are first imported): for tests.

Both paths give the same selection (the same indices in the same order, ties by the lower latent index) and the
same gradients up to summation order. Float64 pre-activations are selected with ``torch.topk`` in every mode (a
float64 value leaves no room for the column in a 64-bit key, ``topk.supports``). This module imports Triton only
when a Triton kernel is about to run.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

ENV = "LIT_SAE_KERNELS"
MODES = ("auto", "torch", "triton")
_override: Optional[str] = None


def set_mode(mode: Optional[str]) -> None:
    """Use ``mode`` (one of ``MODES``) in this process from now on; None: back to ``LIT_SAE_KERNELS``.

    Raises:
        ValueError: an unknown mode."""
    global _override
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {', '.join(MODES)}")
    _override = mode


def mode() -> str:
    """The mode in force: ``set_mode``'s, else ``LIT_SAE_KERNELS``, else ``auto``.

    Raises:
        ValueError: ``LIT_SAE_KERNELS`` holds an unknown value (the message names the variable and the choices)."""
    if _override is not None:
        return _override
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(MODES)}: unset it or pick one")
    return value


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the ``triton`` package is installed (found without importing it)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(t: Tensor) -> bool:
    """Whether work on tensor ``t`` goes to the Triton kernels in the current mode.

    Raises:
        RuntimeError: mode ``triton`` without the package, or on a CPU tensor when the kernels are not interpreted."""
    m = mode()
    if m == "torch":
        return False
    if m == "auto":
        return t.is_cuda and available()
    if not available():
        raise RuntimeError(f"{ENV}=triton but the triton package is not installed: pip install 'lit-sae[gpu]'")
    if not t.is_cuda and not interpreted():
        raise RuntimeError(f"{ENV}=triton on a {t.device.type} tensor: only CUDA runs Triton kernels natively; set "
                           "TRITON_INTERPRET=1 before lit_sae's Triton kernels are first imported to interpret them")
    return True


def interpreted() -> bool:
    """Whether this process's Triton kernels were built for the Triton interpreter (imports them)."""
    from lit_sae.sae.triton_kernels import topk

    return type(topk._select_kernel).__name__ == "InterpretedFunction"


def selects(dtype: torch.dtype) -> bool:
    """Whether the Triton selection handles pre-activations of ``dtype`` (not float64)."""
    return dtype in (torch.float32, torch.bfloat16, torch.float16)


def dead_bits(dead_idx: Tensor, n: int) -> Tensor:
    """The dead-latent bitmap (``topk.dead_bitmap``) of ascending dead indices ``dead_idx`` among ``n`` latents."""
    from lit_sae.sae.triton_kernels import topk

    mask = torch.zeros(n, dtype=torch.bool, device=dead_idx.device)
    mask[dead_idx] = True
    return topk.dead_bitmap(mask)


def select(pre: Tensor, K: int, bits: Optional[Tensor], k_aux: int):
    """``topk.select``: (values, indices, aux_values, aux_indices) of a pre-activation chunk."""
    from lit_sae.sae.triton_kernels import topk

    return topk.select(pre, K, bits, k_aux)


def gather_sum(values: Tensor, indices: Tensor, W: Tensor, init: Optional[Tensor] = None) -> Tensor:
    """``sparse.gather_sum``."""
    from lit_sae.sae.triton_kernels import sparse

    return sparse.gather_sum(values, indices, W, init)


def gather_dot(indices: Tensor, W: Tensor, G: Tensor) -> Tensor:
    """``sparse.gather_dot``."""
    from lit_sae.sae.triton_kernels import sparse

    return sparse.gather_dot(indices, W, G)


def scatter_sorted(rows: Tensor, g: Tensor, starts: Tensor, X: Tensor, n: int) -> Tensor:
    """``sparse.scatter_sorted``."""
    from lit_sae.sae.triton_kernels import sparse

    return sparse.scatter_sorted(rows, g, starts, X, n)
