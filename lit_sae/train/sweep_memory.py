"""A sweep's memory: the training bytes of each SAE (``estimate_bytes``) and the memory a device has free
(``available_bytes``), so that a grid that cannot fit is refused before training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

# Bytes per SAE parameter during training: fp32 weight, gradient and Adam's two moments.
BYTES_PER_PARAM = 16
# Dense (B, n_latents) fp32 temporaries alive at once in a step (pre-activations, their gradient, the code's mask).
DENSE_BUFFERS = 3


def estimate_bytes(d_in: int, spec: dict[str, Any], batch_tokens: int) -> int:
    """Training memory of one SAE: parameters x 16 bytes (weight, grad, Adam moments; 4 more with ``ema_decay``,
    the EMA's shadow copy) plus the dense (B, n_latents) fp32 temporaries of a step. An estimate (a lower bound: the
    allocator and the data add more; a relu / jumprelu code wider than its final L0 early in training adds more)."""
    n = int(spec["n_latents"])
    params = 2 * n * d_in + n + d_in + n
    per_param = BYTES_PER_PARAM + (4 if spec.get("ema_decay") is not None else 0)
    return per_param * params + DENSE_BUFFERS * 4 * batch_tokens * n


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory of ``device``: CUDA's free memory, or MemAvailable of /proc/meminfo on CPU (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
