"""Bias-corrected exponential moving average of a model's parameters (as in OpenAI's TopK SAE training code)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copy of ``model``'s parameters, updated after each optimizer step.

    The shadow starts at zero and is divided by (1 - decay^t) when read, so early averages are not biased towards
    zero or towards the initialisation. Its buffers live in the owner's state_dict, so checkpoints carry them.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay={decay} must lie in (0, 1), e.g. 0.999")
        self.decay = decay
        self._names = [name for name, _ in model.named_parameters()]
        for name, p in model.named_parameters():
            self.register_buffer(_key(name), torch.zeros_like(p.detach()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current parameters of ``model`` into the average."""
        self.steps += 1
        for name, p in model.named_parameters():
            getattr(self, _key(name)).lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def averaged(self) -> dict[str, torch.Tensor]:
        """The bias-corrected averages, by parameter name."""
        correction = 1.0 - self.decay ** max(int(self.steps), 1)
        return {name: getattr(self, _key(name)) / correction for name in self._names}

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (for validation, test, export)."""
        if int(self.steps) == 0:
            yield model
            return
        params = dict(model.named_parameters())
        saved = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, value in self.averaged().items():
                params[name].copy_(value)
            # An average of unit-norm decoder rows is slightly shorter: fold the norms into the encoder so the
            # averaged SAE keeps unit-norm rows (what evaluation sees is what an export holds).
            fold = getattr(model, "fold_decoder_norms_", None)
            if fold is not None:
                fold()
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)


def _key(name: str) -> str:
    return "shadow_" + name.replace(".", "__")
