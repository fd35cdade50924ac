"""Transcoders and skip-transcoders: a sparse code of one activation that reconstructs another.

    z = code(W_enc (x_n - b_pre) + b_enc)                   x_n = s_in x    (the input, e.g. an MLP's input)
    y_hat_n = W_dec^T z + b_dec [+ W_skip x_n]              y_n = s_out y   (the target, e.g. that MLP's output)

A transcoder replaces a computation (Dunefsky, Chlenski and Nanda 2024, "Transcoders find interpretable LLM feature
circuits"); the skip term is the linear bypass of Paulo, Shabalin and Belrose 2025 ("Transcoders beat sparse
autoencoders for interpretability", section 2), ``W_skip`` (d_out, d_in) starting at zero as theirs. Everything
else is the SAE's recipe (``TopKSAE``, which this class extends): the code is any of its activations (topk,
batchtopk, matryoshka, relu, jumprelu) with the same kernels; AuxK explains the residual of the *target*; decoder
rows (n_latents, d_out) have unit norm and their parallel gradient is removed; the loss is NMSE of the target (MSE
divided by the target's batch variance).

``b_pre`` (d_in,) centres the input (its geometric median at the start of a fit); ``b_dec`` (d_out,) is the target's
bias (the target's geometric median at the start, as the SAE's b_pre). ``normalize='scalar'`` keeps one factor per
side (E||x_n||^2 = d_in, E||y_n||^2 = d_out); ``layernorm`` is refused: a per-token statistic of the target is not
known when the transcoder replaces it.

The encoder starts as random unit rows times ``encoder_init_norm``, independent of the decoder (the SAE's tied init
W_enc = W_dec^T has no meaning when input and target are different spaces).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lit_sae.sae.checks import check_acts, check_code, check_mask
from lit_sae.sae.median import geometric_median
from lit_sae.sae.model import ENCODER_INIT_NORM, TopKSAE
from lit_sae.sae.output import SAEOutput

__all__ = ["Transcoder", "is_transcoder"]


def is_transcoder(sae: nn.Module) -> bool:
    """True for a ``Transcoder`` (its input and target are different activations)."""
    return isinstance(sae, Transcoder)


class Transcoder(TopKSAE):
    """A ``TopKSAE`` whose code of ``x`` (B, d_in) reconstructs a target ``y`` (B, d_out).

    Args:
        d_in: width of the input activations.
        n_latents, k: as ``TopKSAE``.
        d_out: width of the target activations (default d_in).
        skip: add the linear skip term ``W_skip x_n`` (d_out, d_in), initialised at zero (Paulo et al. 2025).
        **kwargs: every other ``TopKSAE`` setting (activation, k_aux, auxk_coef, multi_topk, normalize 'none' or
            'scalar', encoder_init_norm, fast, sparsity_coef, ...). ``k_aux`` defaults to d_out // 2.

    ``forward(x, dead_mask, target=y)`` returns an ``SAEOutput`` whose ``x_hat`` is the prediction of the target
    (B, d_out) in the target's units and whose ``nmse`` / ``mse_loss`` / ``auxk_loss`` are those of the target.

    Raises:
        ValueError: ``d_out`` not positive, ``normalize='layernorm'``, or a ``TopKSAE`` setting that cannot train
            (each message names its key).
    """

    def __init__(self, d_in: int, n_latents: int, k: int, *, d_out: Optional[int] = None, skip: bool = False,
                 **kwargs: Any):
        d_out = d_in if d_out is None else d_out
        if not isinstance(d_out, int) or d_out <= 0:
            raise ValueError(f"d_out={d_out!r} must be a positive width (the target's; null for d_in)")
        if kwargs.get("normalize", "none") == "layernorm":
            raise ValueError("normalize='layernorm' cannot be used by a transcoder: the target's per-token mean and "
                             "std are unknown where the transcoder replaces it; use 'none' or 'scalar'")
        if kwargs.get("k_aux") is None:
            kwargs["k_aux"] = max(d_out // 2, 1)
        super().__init__(d_in, n_latents, k, **kwargs)
        self.d_out, self.skip = d_out, bool(skip)
        encoder_init_norm = kwargs.get("encoder_init_norm", ENCODER_INIT_NORM)
        W_enc = torch.randn(n_latents, d_in)
        self.W_enc = nn.Parameter(W_enc / W_enc.norm(dim=1, keepdim=True) * encoder_init_norm)
        W_dec = torch.randn(n_latents, d_out)
        self.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if self.skip else None
        # The target's scale (normalize='scalar'); the input's is TopKSAE's norm_scale.
        self.register_buffer("target_scale", torch.ones(()))

    # ---------------------------------------------------------------- the target's space
    def normalize_target(self, y: Tensor) -> Tensor:
        """Target-space (B, d_out) -> the transcoder's space (times ``target_scale`` for 'scalar')."""
        return y * self.target_scale if self.normalize == "scalar" else y

    def denormalize_target(self, y_n: Tensor) -> Tensor:
        """Inverse of ``normalize_target``."""
        return y_n / self.target_scale if self.normalize == "scalar" else y_n

    def _base_n(self, x_n: Tensor) -> Tensor:
        """b_dec, plus the skip term W_skip x_n (B, d_out) when there is one."""
        if self.W_skip is None:
            return self.b_dec
        return x_n @ self.W_skip.T.to(x_n.dtype) + self.b_dec

    @torch.no_grad()
    def init_from_data_(self, sample: Tensor, target: Optional[Tensor] = None) -> None:
        """Set both scales, b_pre (the input's geometric median) and b_dec (the target's) from row-aligned samples
        ``sample`` (N, d_in) and ``target`` (N, d_out).

        Raises:
            ValueError: a sample missing, of the wrong width, empty, or the two of different row counts (nothing is
                changed)."""
        if target is None:
            raise ValueError("target: a transcoder initialises b_dec from target activations (N, d_out); pass them")
        check_acts(sample, self.d_in, "sample")
        check_acts(target, self.d_out, "target")
        if sample.shape[0] == 0 or sample.shape[0] != target.shape[0]:
            raise ValueError(f"sample and target: expected the same N >= 1 rows (the same tokens), got "
                             f"{sample.shape[0]} and {target.shape[0]}")
        sample = sample.to(self.W_dec.device, torch.float32)
        target = target.to(self.W_dec.device, torch.float32)
        if self.normalize == "scalar":
            self.norm_scale.fill_(math.sqrt(self.d_in / float(sample.double().pow(2).sum(dim=1).mean())))
            self.target_scale.fill_(math.sqrt(self.d_out / float(target.double().pow(2).sum(dim=1).mean())))
        x_n, _ = self.normalize_input(sample)
        self.b_pre.copy_(geometric_median(x_n))
        self.b_dec.copy_(geometric_median(self.normalize_target(target)))
        self.data_initialized.fill_(True)

    # ---------------------------------------------------------------- decode / forward
    def decode(self, values: Tensor, indices: Tensor, info=None, x: Optional[Tensor] = None) -> Tensor:
        """Prediction of the target (B, d_out) in its units = W_dec^T z + b_dec (+ W_skip x_n), normalisation undone.

        ``x`` (B, d_in): the input the code was computed from; required with a skip term. ``info`` is unused (a
        transcoder has no per-token normalisation state); it keeps ``decode(*encode(x, True), x=x)`` valid.

        Raises:
            ValueError: bad code shapes or dtypes, or ``x`` missing / of the wrong width with a skip term."""
        check_code(values, indices, self.n_latents)
        base = self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("x: a skip-transcoder's prediction needs the input (B, d_in): decode(v, i, x=x)")
            x_n, _ = self.normalize_input(check_acts(x, self.d_in).to(self.W_dec.dtype))
            base = self._base_n(x_n)
        return self.denormalize_target(self._decode_n(values, indices) + base)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The prediction of the target from input ``x`` (B, d_in): (B, d_out) in the transcoder's dtype."""
        values, indices = self.encode(x)
        return self.decode(values, indices, x=x)

    def forward(self, x: Tensor, dead_mask: Optional[Tensor] = None, target: Optional[Tensor] = None) -> SAEOutput:
        """Encode ``x`` (B, d_in), predict ``target`` (B, d_out) (the same B tokens) and compute the losses.

        Raises:
            ValueError: ``target`` missing, a tensor of the wrong width, the two of different row counts, or
                ``dead_mask`` not a (n_latents,) bool tensor, all before any state is updated."""
        check_acts(x, self.d_in)
        if target is None:
            raise ValueError("target: a transcoder's forward needs the target activations (B, d_out): "
                             "forward(x, dead_mask, target=y)")
        check_acts(target, self.d_out, "target")
        if target.shape[0] != x.shape[0]:
            raise ValueError(f"x and target: expected the same B rows (the same tokens), got {x.shape[0]} and "
                             f"{target.shape[0]}")
        if dead_mask is not None:
            check_mask(dead_mask, self.W_enc.shape[0])
        x_n, _ = self.normalize_input(x.to(self.W_dec.dtype))
        y_n = self.normalize_target(target.to(self.W_dec.dtype))
        out = self._objective(x_n, y_n, self._base_n(x_n), dead_mask)
        return out._replace(x_hat=self.denormalize_target(out.x_hat))

    def config(self) -> dict[str, Any]:
        """The constructor arguments (``Transcoder(**t.config())`` rebuilds its shapes and computation)."""
        return {**super().config(), "d_out": self.d_out, "skip": self.skip}
