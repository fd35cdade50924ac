"""Training objectives of the baseline architectures beside TopK: ReLU + L1, JumpReLU, Matryoshka BatchTopK.

Plain tensor functions (no Lightning); ``TopKSAE`` calls them for ``activation`` = ``relu``, ``jumprelu`` and
``matryoshka_batchtopk``. Codes stay sparse for the decoder: ``pack`` turns a dense (B, n_latents) activation into
zero-padded (values, indices) of width = the batch's largest per-token L0 (which is not fixed for these
architectures), so decoding costs B x width x d_in, not B x n_latents x d_in. The encoder's pre-activations are dense,
as in every ReLU-family SAE.

ReLU + L1 (Gao et al. 2024, section 2.2 and OpenAI's ``sparse_autoencoder/loss.py``):
    loss = NMSE + l1_coef * w(step) * mean_b ||z_b||_1 / ||x_b||_2
The penalty is divided by each token's input norm (OpenAI's ``normalized_L1_loss``) because lit-sae's
reconstruction term is normalised MSE: both terms are then invariant to the activations' scale, so one coefficient
means the same on any model or layer. Decoder rows are kept at unit norm (as for TopK), so ||z||_1 equals SAELens's
decoder-norm-weighted L1. w(step) ramps linearly from 0 to 1 over ``sparsity_warmup_steps`` (SAELens's
``l1_warm_up_steps``).

JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead", sections 3-4; Gemma Scope):
    z = pre * H(pre - theta)   (relu'd),   loss = NMSE + l0_coef * w(step) * mean_b sum_i H(pre_bi - theta_i)
H has no useful derivative, so the threshold theta (one per latent, learned) gets the straight-through estimator of
the paper (eq. 11-12) with a rectangle kernel K(u) = 1{|u| < 1/2} of bandwidth eps:
    d z_i / d theta_i = -(theta_i / eps) K((pre_i - theta_i) / eps),   d H / d theta_i = -(1 / eps) K(...)
and d z / d pre = H(pre - theta) (no gradient into pre through H). dz/dtheta is non-zero also where z = 0 (pre just
below theta): the training code therefore carries zero-valued entries at those positions (see ``jumprelu_code``).

Matryoshka BatchTopK (Bussmann et al. 2025, "Learning multi-level features with Matryoshka SAEs", section 3):
a BatchTopK code whose nested prefixes (latents [0, m_1), [0, m_2), ..., [0, n_latents)) each reconstruct the input:
    loss = mean over prefixes of NMSE(x, b_pre + sum_{i < m} z_i W_dec[i])
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lit_sae.sae.losses import normalized_mse

ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu", "matryoshka_batchtopk")
#: Other spellings accepted for an activation (the short name SAEBench's tables use).
ALIASES = {"matryoshka": "matryoshka_batchtopk"}
# Rajamanoharan et al. 2024 / Gemma Scope: bandwidth 0.001 and initial threshold 0.001 (their inputs are scaled to a
# fixed mean squared norm, as lit-sae's normalize='scalar' does).
JUMPRELU_BANDWIDTH = 1e-3
JUMPRELU_INIT_THRESHOLD = 1e-3
# The thresholds' Adam learning rate as a multiple of the SAE's. Adam moves every parameter by about lr a step, so a
# threshold moves by lr while a pre-activation (a sum over d_in encoder weights) can move by about lr * ||x_c||_1:
# at lr's scale the penalty cannot keep up with the encoder in a short run. Measured on SmolLM2-135M layer 20
# (d_in 576, n_latents 512, 263 steps of 1024 tokens, scalar normalisation): at x1 the code stayed dense (L0 505 of
# 512) whatever the L0 weight (3e-4 to 3e-2); at x30 the weights 1e-3 / 3e-3 / 1e-2 gave L0 111 / 33 / 13 with NMSE
# within 2-10% of TopK's at the same L0 (x10: 12-15% worse; x100: 17% worse at L0 28).
JUMPRELU_THRESHOLD_LR_SCALE = 30.0
#: The activations each architecture-specific setting applies to (a setting given for another one is refused).
APPLIES_TO = {
    "sparsity_coef": ("relu", "jumprelu"),
    "sparsity_warmup_steps": ("relu", "jumprelu"),
    "jumprelu_bandwidth": ("jumprelu",),
    "jumprelu_init_threshold": ("jumprelu",),
    "jumprelu_threshold_lr_scale": ("jumprelu",),
    "matryoshka_prefixes": ("matryoshka_batchtopk",),
    "multi_topk": ("topk",),
    "k_aux": ("topk", "batchtopk", "matryoshka_batchtopk"),
}
#: Settings an activation cannot train without.
REQUIRED = {"relu": ("sparsity_coef",), "jumprelu": ("sparsity_coef",),
            "matryoshka_batchtopk": ("matryoshka_prefixes",)}


def canonical(activation: str, key: str = "activation") -> str:
    """The canonical name of ``activation`` (``ALIASES`` resolved). Raises ValueError naming ``key``, the known names
    and the closest one ("did you mean") for an unknown name."""
    import difflib

    name = ALIASES.get(activation, activation) if isinstance(activation, str) else activation
    if name in ACTIVATIONS:
        return name
    known = [*ACTIVATIONS, *ALIASES]
    close = difflib.get_close_matches(str(activation), known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"{key}={activation!r} is unknown: {hint}use one of {', '.join(map(repr, known))}")


def check_applicable(activation: str, given: dict, prefix: str = "", settings: Optional[dict] = None) -> None:
    """Refuse settings that do not apply to ``activation`` and missing required ones (ValueError naming the key).

    ``given``: the settings the user set for this SAE (None values count as not set); ``settings``: all its settings
    (default ``given``; defaults shared by several SAEs count for the required ones only); ``prefix`` is put before
    each key's name in the message (e.g. ``model.``)."""
    activation = canonical(activation, f"{prefix}activation")
    for key, value in given.items():
        if key in APPLIES_TO and value is not None and value is not False and activation not in APPLIES_TO[key]:
            raise ValueError(f"{prefix}{key}={value!r} does not apply to activation={activation!r} (only to "
                             f"{', '.join(APPLIES_TO[key])}): remove it or change the activation")
    for key in REQUIRED.get(activation, ()):
        if (given if settings is None else settings).get(key) is None:
            example = {"sparsity_coef": "e.g. 0.05 for relu's L1, 0.01 for jumprelu's L0",
                       "matryoshka_prefixes": "increasing prefix sizes, e.g. [n_latents/16, n_latents/4]"}[key]
            raise ValueError(f"{prefix}{key} is required with activation={activation!r}: set it ({example})")


def check_settings(activation: str, sparsity_coef: float, sparsity_warmup_steps: int, jumprelu_bandwidth: float,
                   jumprelu_init_threshold: float, matryoshka_prefixes: Optional[Sequence[int]],
                   n_latents: int) -> None:
    """Reject settings of these architectures that cannot train, naming the key and the fix (ValueError)."""
    activation = canonical(activation)
    if not sparsity_coef >= 0:
        raise ValueError(f"sparsity_coef={sparsity_coef} must be >= 0 (the L1 / L0 penalty weight)")
    if sparsity_warmup_steps < 0:
        raise ValueError(f"sparsity_warmup_steps={sparsity_warmup_steps} must be >= 0")
    if not jumprelu_bandwidth > 0:
        raise ValueError(f"jumprelu_bandwidth={jumprelu_bandwidth} must be > 0 (the paper: 0.001)")
    if not jumprelu_init_threshold >= 0:
        raise ValueError(f"jumprelu_init_threshold={jumprelu_init_threshold} must be >= 0 (the paper: 0.001)")
    if activation == "matryoshka_batchtopk":
        prefixes = list(matryoshka_prefixes or [])
        if not prefixes or prefixes != sorted(set(prefixes)) or prefixes[0] <= 0 or prefixes[-1] > n_latents:
            raise ValueError(f"matryoshka_prefixes={matryoshka_prefixes}: give increasing prefix sizes in "
                             f"(0, n_latents={n_latents}], e.g. [{max(n_latents // 16, 1)}, {max(n_latents // 4, 1)}]")
    elif matryoshka_prefixes:
        raise ValueError("matryoshka_prefixes is only used with activation='matryoshka_batchtopk'")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear ramp of the sparsity penalty: (step + 1) / warmup_steps for the first steps, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def pack(z: Tensor) -> tuple[Tensor, Tensor]:
    """Sparse (values, indices) of a dense non-negative code ``z`` (B, n): width = the largest row L0 (at least 1),
    rows zero-padded. Differentiable in ``z`` (the gradient of the padding reaches zeros of z only)."""
    width = max(int((z > 0).sum(dim=1).max()), 1) if z.shape[0] else 1
    return z.topk(width, dim=1)


def normalized_l1(values: Tensor, x_n: Tensor) -> Tensor:
    """OpenAI's normalised L1: mean over tokens of ||z_b||_1 / ||x_b||_2. values: (B, width); x_n: (B, d_in)."""
    return (values.abs().sum(dim=1) / x_n.norm(dim=1).clamp_min(torch.finfo(x_n.dtype).tiny)).mean()


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z = relu(pre) * (pre > theta), with the exact gradient in pre (theta's comes from ``_window_code``)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor):
        on = (pre > threshold) & (pre > 0)
        ctx.save_for_backward(on)
        return pre * on.to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (on,) = ctx.saved_tensors
        return grad * on.to(grad.dtype), None


class _WindowSTE(torch.autograd.Function):
    """Zeros (B, w) whose gradient in theta is the paper's dz/dtheta = -(theta_i / eps) K(...) at the packed window
    positions: decoded with the code, they carry dL/dz_bi = W_dec[i] . dL/dx_hat_b to theta, also where z_bi = 0
    (pre just below theta), which the packed code alone cannot."""

    @staticmethod
    def forward(ctx, threshold: Tensor, indices: Tensor, valid: Tensor, bandwidth: float):
        ctx.save_for_backward(threshold, indices, valid)
        ctx.bandwidth = bandwidth
        return torch.zeros(indices.shape, dtype=threshold.dtype, device=threshold.device)

    @staticmethod
    def backward(ctx, grad: Tensor):
        threshold, indices, valid = ctx.saved_tensors
        contrib = grad * -(threshold[indices] / ctx.bandwidth) * valid.to(grad.dtype)
        return torch.zeros_like(threshold).index_add_(0, indices.flatten(), contrib.flatten()), None, None, None


def _window_code(pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """Zero-valued (values, indices) (B, w) at the (token, latent) pairs with |pre - theta| < eps / 2, w = the
    largest count per token (at least 1; padding entries carry no gradient)."""
    window = _rectangle((pre.detach() - threshold.detach()) / bandwidth)
    width = max(int(window.sum(dim=1).max()), 1) if pre.shape[0] else 1
    valid, indices = window.topk(width, dim=1)
    return _WindowSTE.apply(threshold, indices, valid, bandwidth), indices


class _Step(torch.autograd.Function):
    """H(pre - theta) (as the code's L0): no gradient in pre, the paper's STE pseudo-derivative in theta."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return ((pre > threshold) & (pre > 0)).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return None, grad_theta.sum(dim=0), None


def jumprelu_code(pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """Training code (values, indices) of pre-activations ``pre`` (B, n) with per-latent ``threshold`` (n,): the
    packed JumpReLU code followed by zero-valued entries for the STE window (``_window_code``), so decoding it gives
    the reconstruction, the exact gradients in the weights and the paper's pseudo-gradient in the threshold."""
    values, indices = pack(_JumpReLU.apply(pre, threshold))
    w_values, w_indices = _window_code(pre, threshold, bandwidth)
    return torch.cat([values, w_values], dim=1), torch.cat([indices, w_indices], dim=1)


def jumprelu_l0(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Mean over tokens of the number of active latents, differentiable in ``threshold`` by the STE (scalar)."""
    return _Step.apply(pre, threshold, bandwidth).sum(dim=1).mean()


def threshold_code(acts: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """(values, indices) of the ReLU'd activations ``acts`` (B, n) above ``threshold`` (scalar or (n,); a negative
    threshold acts as 0, as relu(pre) * (pre > threshold) does). Rows are zero-padded to the batch's largest count."""
    mask = acts > threshold.clamp_min(0)
    width = max(int(mask.sum(dim=1).max()), 1) if acts.shape[0] else 1
    return torch.where(mask, acts, torch.zeros_like(acts)).topk(width, dim=1)


def threshold_encode(pre: Tensor, x_n: Tensor, activation: str, threshold: Tensor, bandwidth: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """relu / jumprelu code of pre-activations ``pre`` (B, n): (values (B, width), indices (B, width) int64,
    sparsity). sparsity: relu, the normalised L1 of the code (x_n: (B, d_in), the SAE-space input); jumprelu, the
    mean L0, differentiable in ``threshold`` by the STE. Without autograd the code is thresholded directly."""
    if not torch.is_grad_enabled():
        values, indices = threshold_code(torch.relu(pre), threshold)
    elif activation == "jumprelu":
        values, indices = jumprelu_code(pre, threshold, bandwidth)
    else:
        values, indices = pack(torch.relu(pre))
    if activation == "relu":
        return values, indices, normalized_l1(values, x_n)
    if torch.is_grad_enabled():
        return values, indices, jumprelu_l0(pre, threshold, bandwidth)
    return values, indices, (values > 0).sum(dim=1).to(pre.dtype).mean()


def batchtopk_encode(pre: Tensor, k: int, threshold: Tensor, momentum: float, training: bool,
                     dead_mask: Optional[Tensor], k_aux: int):
    """BatchTopK (Bussmann et al., 2024): the k*B largest ReLU'd activations of the batch in training (updating the
    running ``threshold`` buffer in place: the smallest kept value, EMA with ``momentum``), the threshold at
    inference. pre: (B, n). Returns (values, indices, None, None, aux_values, aux_indices); rows zero-padded to the
    batch's largest count; aux: the top-k_aux dead pre-activations (relu'd) when ``dead_mask`` has any. Dense."""
    acts = torch.relu(pre)
    if training:
        flat = acts.flatten()
        kept = flat.topk(min(k * acts.shape[0], flat.numel()), sorted=False)
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, kept.indices, True).view_as(acts)
        mask &= acts > 0
        with torch.no_grad():
            positive = kept.values[kept.values > 0]
            if positive.numel():
                smallest = positive.min()
                first = float(threshold) == 0.0
                threshold.copy_(smallest if first else momentum * threshold + (1 - momentum) * smallest)
        width = max(int(mask.sum(dim=1).max()), 1)
        values, indices = torch.where(mask, acts, torch.zeros_like(acts)).topk(width, dim=1)
    else:
        values, indices = threshold_code(acts, threshold)
    aux_values = aux_indices = None
    if dead_mask is not None and bool(dead_mask.any()):
        aux = pre.masked_fill(~dead_mask, float("-inf")).topk(min(k_aux, int(dead_mask.sum())), dim=1)
        aux_values, aux_indices = torch.relu(aux.values), aux.indices
    return values, indices, None, None, aux_values, aux_indices


def matryoshka_nmse(decode, values: Tensor, indices: Tensor, b_pre: Tensor, x_n: Tensor,
                    prefixes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(mean over prefixes of NMSE(x_n, prefix reconstruction), the last prefix's reconstruction (B, d_in)).

    ``decode(values, indices)`` -> (B, d_in) without b_pre; ``prefixes``: increasing sizes, the last one n_latents.
    Each group of latents [m_{j-1}, m_j) is decoded once (values outside it zeroed) and added to the previous prefix's
    reconstruction."""
    recon = b_pre.to(x_n.dtype).expand_as(x_n)
    losses = []
    for lo, hi in zip([0, *prefixes[:-1]], prefixes):
        in_group = ((indices >= lo) & (indices < hi)).to(values.dtype)
        recon = recon + decode(values * in_group, indices).to(x_n.dtype)
        losses.append(normalized_mse(recon, x_n))
    return torch.stack(losses).mean(), recon
