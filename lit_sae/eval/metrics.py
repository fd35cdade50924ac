"""Evaluation metrics for sparse autoencoders as torchmetrics ``Metric`` classes.

Every metric keeps sufficient statistics (sums and counts) rather than per-batch averages, so the value over many
batches, or over several DDP ranks (states are summed across ranks), equals the value over the whole set at once.
Sums of squared errors and moments are kept in float64: activations of language models have a large mean, and the
variance in the NMSE denominator is a difference of two large numbers.

Shapes: ``x``, ``x_hat``: (..., d_in), flattened to (N, d_in); ``latent_values``, ``latent_indices``: (..., k).
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

__all__ = ["NormalizedMSE", "RelativeMSE", "L0", "FeatureDensity"]


def _check_pair(x, x_hat, metric: str) -> None:
    """x and x_hat: floating tensors of one shape (..., d_in)."""
    if not (torch.is_tensor(x) and torch.is_tensor(x_hat)) or x.shape != x_hat.shape or x.ndim == 0:
        raise ValueError(f"{metric}: expected x and x_hat of one shape (B, d_in), got "
                         f"{tuple(getattr(x, 'shape', ()))} and {tuple(getattr(x_hat, 'shape', ()))}")
    if not (x.is_floating_point() and x_hat.is_floating_point()):
        raise ValueError(f"{metric}: expected floating x and x_hat, got {x.dtype} and {x_hat.dtype}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (N, d) float64."""
    return t.reshape(-1, t.shape[-1]).to(torch.float64)


class NormalizedMSE(Metric):
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole set.

    ``mean(x)`` is the mean over every token seen (all batches, all ranks), not per batch: the metric keeps
    per-dimension sums of x and x^2 and the token count, so the denominator is exact at ``compute`` time.
    This is the paper's normalized MSE.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, d_in: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.add_state("sum_sq_err", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        # Per-dimension moments. Without d_in they are sized on the first update; pass d_in under DDP when a rank
        # may see no batch at all (states of different shapes cannot be summed across ranks).
        n = 0 if d_in is None else int(d_in)
        self.add_state("sum_x", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x2", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Accumulate one batch. x, x_hat: (..., d_in), any float dtype.

        Raises:
            ValueError: shapes differ, non-floating dtypes, or another d_in than earlier batches (before any
                state changes)."""
        _check_pair(x, x_hat, "NormalizedMSE")
        x = _rows(x)
        x_hat = _rows(x_hat)
        if x.shape != x_hat.shape:
            raise ValueError(f"NormalizedMSE: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
        if self.sum_x.numel() != x.shape[1]:
            if self.sum_x.numel():
                raise ValueError(f"NormalizedMSE: got d_in {x.shape[1]}, expected {self.sum_x.numel()}")
            self.sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.sum_x2 = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        self.sum_sq_err += (x - x_hat).pow(2).sum()
        self.sum_x += x.sum(0)
        self.sum_x2 += x.pow(2).sum(0)
        self.count += x.shape[0]

    def compute(self) -> torch.Tensor:
        """The normalized MSE as a float64 scalar (nan before any update)."""
        n = self.count.to(torch.float64)
        if self.count == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        total_var = (self.sum_x2 - self.sum_x.pow(2) / n).sum()
        return self.sum_sq_err / total_var


class RelativeMSE(Metric):
    """Mean over tokens of ||x - x_hat||^2 / ||x||^2 (the normalized MSE that OpenAI's sparse_autoencoder README
    reports). Not the same as :class:`NormalizedMSE`: it normalises by each token's own squared norm, not by the
    variance around the mean, so it is much smaller when activations have a large mean."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, eps: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("sum_ratio", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Accumulate one batch. x, x_hat: (..., d_in), any float dtype.

        Raises:
            ValueError: shapes differ or non-floating dtypes (before any state changes)."""
        _check_pair(x, x_hat, "RelativeMSE")
        x = _rows(x)
        x_hat = _rows(x_hat)
        ratio = (x - x_hat).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(self.eps)
        self.sum_ratio += ratio.sum()
        self.count += x.shape[0]

    def compute(self) -> torch.Tensor:
        """Mean per-token relative squared error (float64 scalar)."""
        return self.sum_ratio / self.count.to(torch.float64)


class L0(Metric):
    """Mean number of active latents per token: values > 0 counted from ``latent_values`` (B, k).

    TopK keeps k values per token, but some may be zero after the ReLU (and BatchTopK varies per token), so the
    count is taken from the values, not from k."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("active", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, latent_values: torch.Tensor) -> None:
        """Accumulate one batch. latent_values: (..., k) floating.

        Raises:
            ValueError: not a floating tensor with at least one dimension (before any state changes)."""
        if not torch.is_tensor(latent_values) or latent_values.ndim == 0 or not latent_values.is_floating_point():
            raise ValueError(f"L0: expected floating latent_values of shape (B, k), got "
                             f"{getattr(latent_values, 'dtype', type(latent_values).__name__)} "
                             f"{tuple(getattr(latent_values, 'shape', ()))}")
        v = latent_values.reshape(-1, latent_values.shape[-1])
        self.active += (v > 0).sum()
        self.count += v.shape[0]

    def compute(self) -> torch.Tensor:
        """Mean active latents per token (float64 scalar)."""
        return self.active.to(torch.float64) / self.count.to(torch.float64)


class FeatureDensity(Metric):
    """Fraction of tokens on which each latent fires (value > 0).

    ``compute()`` returns the (n_latents,) float64 density vector. :meth:`dead_fraction` is the fraction of latents
    that never fired on the data seen; :meth:`log_density_histogram` is the histogram of log10 density over the
    latents that fired (dead latents have log density -inf and are counted separately by ``dead_fraction``).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, n_latents: int, **kwargs):
        super().__init__(**kwargs)
        self.n_latents = int(n_latents)
        self.add_state("fires", default=torch.zeros(self.n_latents, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, latent_values: torch.Tensor, latent_indices: torch.Tensor) -> None:
        """Accumulate one batch. latent_values: (..., k); latent_indices: (..., k) int (same shape).

        Indices are assumed unique within a token (as TopK produces).

        Raises:
            ValueError: shapes differ, wrong dtypes, or an index outside [0, n_latents) (before any state
                changes)."""
        if latent_values.shape != latent_indices.shape or latent_values.ndim == 0:
            raise ValueError(f"FeatureDensity: expected latent_values and latent_indices of one shape (B, k), got "
                             f"{tuple(latent_values.shape)} and {tuple(latent_indices.shape)}")
        if not latent_values.is_floating_point() or latent_indices.is_floating_point():
            raise ValueError(f"FeatureDensity: expected floating values and integer indices, got "
                             f"{latent_values.dtype} and {latent_indices.dtype}")
        if latent_indices.numel() and (int(latent_indices.min()) < 0 or int(latent_indices.max()) >= self.n_latents):
            raise ValueError(f"FeatureDensity: latent_indices must lie in [0, {self.n_latents}), got "
                             f"[{int(latent_indices.min())}, {int(latent_indices.max())}]")
        v = latent_values.reshape(-1, latent_values.shape[-1])
        i = latent_indices.reshape(-1, latent_indices.shape[-1])
        active = i[v > 0].long()
        self.fires += torch.bincount(active, minlength=self.n_latents)[: self.n_latents]
        self.count += v.shape[0]

    def compute(self) -> torch.Tensor:
        """(n_latents,) float64: fraction of tokens each latent fired on."""
        return self.fires.to(torch.float64) / self.count.clamp_min(1).to(torch.float64)

    def dead_fraction(self) -> torch.Tensor:
        """Fraction of latents that never fired (float64 scalar)."""
        return (self.compute() == 0).to(torch.float64).mean()

    def log_density_histogram(
        self, bins: int = 50, low: float | None = None, high: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Histogram of log10(density) over latents that fired: (counts (bins,), edges (bins + 1,)).

        ``low`` defaults to log10(1 / tokens seen), the smallest density a live latent can have."""
        density = self.compute()
        live = density[density > 0]
        if low is None:
            low = -math.log10(max(int(self.count), 2))
        counts = torch.histc(live.log10(), bins=bins, min=low, max=high) if live.numel() else torch.zeros(bins)
        edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
        return counts.to(torch.long), edges
