"""Learning-rate schedules per optimizer step: linear warm-up and linear decay to 0 (the paper's recipe, section 2.3
of Gao et al. 2024; OpenAI's training code warms up and SAELens calls these ``lr_warm_up_steps`` / ``lr_decay_steps``).

Shared by ``SAEModule`` (one SAE) and ``SAESweepModule`` (one schedule per SAE, applied to each of its parameter
groups), with the parameter groups of one SAE (``param_groups``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from lit_sae.sae.activations import JUMPRELU_THRESHOLD_LR_SCALE


def lr_factor(warmup: int, decay_start: Optional[float], total: int) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up over ``warmup`` steps ((step + 1) / warmup), then 1, and a linear decay
    to 0 from step ``decay_start * total`` to ``total`` (``decay_start`` None: no decay)."""
    decay_from = int(decay_start * total) if decay_start is not None else None

    def factor(step: int) -> float:
        f = 1.0
        if warmup and step < warmup:
            f = (step + 1) / warmup
        if decay_from is not None and step >= decay_from:
            f = min(f, max(total - step, 0) / max(total - decay_from, 1))
        return f

    return factor


def param_groups(sae, lr: float, threshold_lr_scale: Optional[float]) -> list[dict]:
    """Adam parameter groups of one SAE: every parameter at ``lr``; a jumprelu SAE's learned thresholds in a
    second group at ``lr * threshold_lr_scale(...)``. The scale is validated where the settings are read
    (``check_threshold_lr_scale`` in ``SAEModule`` and ``SAESweepModule``)."""
    if sae.activation != "jumprelu":
        return [{"params": list(sae.parameters()), "lr": lr}]
    rest = [p for name, p in sae.named_parameters() if name != "threshold"]
    scale = threshold_lr_scale_of(threshold_lr_scale)
    return [{"params": rest, "lr": lr}, {"params": [sae.threshold], "lr": lr * scale}]


def threshold_lr_scale_of(value: Optional[float]) -> float:
    """The thresholds' learning-rate multiple a setting means: ``value``, or when unset (None)
    ``activations.JUMPRELU_THRESHOLD_LR_SCALE`` (where the reason for it is measured)."""
    return JUMPRELU_THRESHOLD_LR_SCALE if value is None else value


def check_threshold_lr_scale(value: Optional[float], key: str = "model.") -> None:
    """ValueError naming the key for a jumprelu threshold learning-rate multiple that is set and not > 0."""
    if value is not None and not value > 0:
        raise ValueError(f"{key}jumprelu_threshold_lr_scale={value} must be > 0 (a multiple of lr; default "
                         f"{JUMPRELU_THRESHOLD_LR_SCALE:g})")


def check_schedule(warmup_steps: int, decay_start: Optional[float], key: str = "model.") -> None:
    """ValueError naming the key for a negative warm-up or a decay start outside [0, 1]."""
    if warmup_steps is None or warmup_steps < 0:
        raise ValueError(f"{key}warmup_steps={warmup_steps} must be >= 0 (0: no warm-up)")
    if decay_start is not None and not 0.0 <= decay_start <= 1.0:
        raise ValueError(f"{key}decay_start={decay_start} must be a fraction of the run in [0, 1]")


def run_length(trainer, needed_by: str) -> int:
    """Optimizer steps of the run: ``trainer.max_steps``, else Lightning's estimate; ValueError naming
    ``needed_by`` (the key that needs it) when the length is unknown (an endless stream without max_steps)."""
    if trainer is None:
        raise ValueError(f"{needed_by} needs a known run length: attach a Trainer with max_steps")
    total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(f"{needed_by} needs a known run length: set trainer.max_steps")
    return int(total)


def step_scheduler(optimizer: torch.optim.Optimizer, trainer, schedules: Sequence[tuple[int, Optional[float], str]]
                   ) -> Optional[dict]:
    """Lightning's scheduler config for one (warmup_steps, decay_start, key prefix) per parameter group of
    ``optimizer`` (a per-step ``LambdaLR``), or None when no group has a schedule."""
    if not any(warmup or decay is not None for warmup, decay, _ in schedules):
        return None
    if len(schedules) != len(optimizer.param_groups):
        raise ValueError(f"{len(schedules)} schedules for {len(optimizer.param_groups)} parameter groups")
    total = None
    factors = []
    for warmup, decay, key in schedules:
        if decay is not None and total is None:
            total = run_length(trainer, f"{key}decay_start")
        factors.append(lr_factor(warmup, decay, total or 0))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factors if len(factors) > 1 else factors[0])
    return {"scheduler": sched, "interval": "step"}
