"""Geometric median by Weiszfeld's iteration: the robust centre the paper uses to initialise b_pre."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7, eps: float = 1e-8) -> Tensor:
    """Point minimising the sum of Euclidean distances to ``points`` (N, d); returns (d,) in float32.

    Computed in float64 from the coordinate-wise mean. ``eps`` keeps a step finite when the estimate lands on a
    data point; iteration stops when the estimate moves less than ``tol`` relative to its norm.
    """
    x = points.detach().to(torch.float64)
    median = x.mean(dim=0)
    for _ in range(max_iter):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        moved = (new - median).norm() / new.norm().clamp_min(eps)
        median = new
        if moved < tol:
            break
    return median.to(torch.float32)
