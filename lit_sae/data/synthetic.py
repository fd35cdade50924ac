"""Synthetic activations made of sparse combinations of known unit directions: ground truth for tests and demos."""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset


def sparse_features(
    n_tokens: int, directions: Tensor, active: int, generator: torch.Generator, mean: Optional[Tensor] = None
) -> Tensor:
    """(n_tokens, d_in) float32: each row sums ``active`` random rows of ``directions`` with magnitudes in [0.5, 1.5),
    plus ``mean`` (a constant offset, as real residual streams have)."""
    n_features = directions.shape[0]
    idx = torch.rand(n_tokens, n_features, generator=generator).topk(active, dim=1).indices
    mags = torch.rand(n_tokens, active, generator=generator) + 0.5
    x = torch.einsum("ta,tad->td", mags, directions[idx])
    return x if mean is None else x + mean


class _Stream(IterableDataset):
    def __init__(self, dm: "SyntheticDataModule", split: str, n_tokens: int):
        self.dm, self.split, self.n_tokens = dm, split, n_tokens

    def __len__(self) -> int:
        return self.n_tokens // self.dm.batch_size_tokens

    def __iter__(self):
        offset = {"train": 1, "val": 2, "test": 3}[self.split]
        g = torch.Generator().manual_seed(self.dm.seed * 1000 + offset + 10 * self.dm.epoch * (self.split == "train"))
        if self.split == "train":
            self.dm.epoch += 1
        for _ in range(len(self)):
            acts = sparse_features(self.dm.batch_size_tokens, self.dm.directions, self.dm.active, g, self.dm.mean)
            yield {"acts": acts}


class SyntheticDataModule(L.LightningDataModule):
    """Tokens built from ``n_features`` random unit directions in ``d_in`` dimensions, ``active`` per token.

    The true directions are ``self.directions`` (n_features, d_in), so a test can check that an SAE recovers them.

    Args:
        d_in: width of the activations.
        n_features: number of true directions.
        active: true features active per token.
        batch_size_tokens: tokens per batch.
        train_tokens: tokens per training epoch.
        val_tokens: tokens in the validation and in the test split.
        offset_norm: norm of a constant offset added to every token (0: none).
        subspace_dim: if set, all directions lie in a random subspace of this dimension (anisotropic data, as real
            activations are: randomly initialised latents far from it rarely win the top-k and die without AuxK).
        seed: fixes the directions and the stream.
    """

    def __init__(
        self,
        d_in: int = 64,
        n_features: int = 512,
        active: int = 5,
        batch_size_tokens: int = 1024,
        train_tokens: int = 1_048_576,
        val_tokens: int = 16_384,
        offset_norm: float = 0.0,
        subspace_dim: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.d_in, self.active, self.seed = d_in, active, seed
        self.batch_size_tokens, self.train_tokens, self.val_tokens = batch_size_tokens, train_tokens, val_tokens
        g = torch.Generator().manual_seed(seed)
        directions = torch.randn(n_features, d_in, generator=g)
        if subspace_dim is not None:
            basis = torch.linalg.qr(torch.randn(d_in, subspace_dim, generator=g)).Q.T  # (subspace_dim, d_in)
            directions = torch.randn(n_features, subspace_dim, generator=g) @ basis
        self.directions = directions / directions.norm(dim=1, keepdim=True)
        mean = torch.randn(d_in, generator=g)
        self.mean = mean / mean.norm() * offset_norm if offset_norm else None
        self.epoch = 0
        self.hook_point: Optional[str] = None  # no language model behind synthetic data
        self.model_name = "synthetic"

    def sample_activations(self, n_tokens: int) -> Tensor:
        """A deterministic sample of ``n_tokens`` activations (for b_pre and scale initialisation)."""
        g = torch.Generator().manual_seed(self.seed * 1000 + 7)
        return sparse_features(n_tokens, self.directions, self.active, g, self.mean)

    def _loader(self, split: str, n_tokens: int) -> DataLoader:
        return DataLoader(_Stream(self, split, n_tokens), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train_tokens)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_tokens)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_tokens)
