"""Scratch memory the fast TopK encoder keeps between calls, per thread (see ``lit_sae.sae.kernels``).

Three kinds: the pre-activation chunk buffers (``_chunk_buffer``, CPU only), the scatter order memo that the
decoder's backward leaves for the encoder's (``lit_sae.sae.scatter._latent_order``) and the per-row latent orders
the decoder's forward leaves for the encoder's backward (``lit_sae.sae.decode_kernels.in_latent_order``).
``release_workspace`` frees them; ``workspace_bytes`` measures the buffers.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_workspace = threading.local()
_WORKSPACE_SLOTS = ("pre", "dead")


def _chunk_buffer(slot: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (rows, cols) scratch buffer for one pre-activation chunk (``slot`` "pre", or "dead" for its AuxK columns).

    On CPU the buffer is kept between calls, per thread: a fresh 256 MiB tensor is fresh memory from the operating
    system, and its page faults cost ~60 ms a step at n 16384 (a sixth of the encoder product; the bare matmul of
    ``scripts/benchmark.py`` writes into a reused buffer too). It holds at most ``kernels.MAX_PREACT_BYTES`` a slot,
    and is never returned to callers or saved for backward. On CUDA the caching allocator already reuses memory.
    ``release_workspace`` frees it.
    """
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    numel = rows * cols
    buf = getattr(_workspace, slot, None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        setattr(_workspace, slot, None)  # drop the old one before allocating its successor
        with torch.inference_mode(False):  # a normal tensor: usable both inside and outside inference mode
            buf = torch.empty(numel, dtype=dtype)
        setattr(_workspace, slot, buf)
    return buf[:numel].view(rows, cols)


def release_workspace() -> None:
    """Free the pre-activation buffers this thread keeps between encoder calls on CPU (``_chunk_buffer``), the
    scatter order kept for the encoder's backward (``_latent_order``) and the per-row orders (``in_latent_order``)."""
    for slot in _WORKSPACE_SLOTS:
        setattr(_workspace, slot, None)
    _workspace.order = None
    _workspace.row_orders = []


def workspace_bytes() -> int:
    """Bytes of the buffers this thread keeps between encoder calls (0 after ``release_workspace``)."""
    bufs = [getattr(_workspace, slot, None) for slot in _WORKSPACE_SLOTS]
    return sum(b.numel() * b.element_size() for b in bufs if b is not None)

