"""What a resumed fit needs besides Lightning's own state: the RNG streams, and a check that nothing saved is NaN."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["nonfinite_entries", "rng_states", "set_rng_states"]


def nonfinite_entries(checkpoint: dict[str, Any]) -> list[str]:
    """Names of the floating tensors in a checkpoint's weights and optimizer state that hold NaN or Inf."""
    bad = [name for name, t in checkpoint.get("state_dict", {}).items()
           if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    for i, state in enumerate(checkpoint.get("optimizer_states", [])):
        for pid, per_param in state.get("state", {}).items():
            for key, t in per_param.items():
                if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(f"optimizer {i} state {pid}.{key}")
    return bad


def rng_states() -> dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states of this process, as plain tensors and tuples (weights_only-safe)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of ``rng_states``."""
    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
