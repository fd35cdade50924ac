"""The TopK sparse autoencoder of Gao et al. (2024) as a plain ``nn.Module``: no Lightning, no files, no DDP.

    z = TopK(W_enc (x - b_pre) + b_enc)          (ReLU on the k kept values)
    x_hat = W_dec^T z + b_pre                     (W_dec rows have unit norm)

``x`` is first mapped into the SAE's space by the chosen input normalisation, and ``x_hat`` mapped back.
Latents are kept sparse as (values, indices) pairs of shape (B, k); no dense (B, n_latents) code is built in
training (the encoder's dense pre-activations exist only inside ``kernels.topk_encode``).

The SAE saves and loads itself in SAELens's layout (``save_pretrained`` / ``from_pretrained``, implemented in
``lit_sae.sae.io``). Besides ``topk`` and ``batchtopk`` it trains the baselines ``relu`` (+ L1), ``jumprelu`` and
``matryoshka_batchtopk``, whose objectives live in ``lit_sae.sae.activations``; SAEs of those architectures from other
libraries load and reconstruct exactly. ``SAEOutput`` is defined in ``lit_sae.sae.output``, the unit-norm decoder
constraint in ``lit_sae.sae.unit_decoder``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from lit_sae.sae import activations, kernels
from lit_sae.sae.checks import check_acts, check_code, check_mask
from lit_sae.sae.config import ENCODER_INIT_NORM, REBUILD_KEYS
from lit_sae.sae.init import draw_decoder
from lit_sae.sae.losses import LOCAL, BatchSum, auxk_loss, normalized_mse
from lit_sae.sae.median import geometric_median
from lit_sae.sae.output import SAEOutput
from lit_sae.sae.unit_decoder import UnitNormDecoder

Activation = Literal["topk", "batchtopk", "relu", "jumprelu", "matryoshka_batchtopk"]
THRESHOLD_CODES = ("relu", "jumprelu")  # dense ReLU-family pre-activations, packed to a code of variable L0
Normalize = Literal["none", "scalar", "layernorm"]

# As OpenAI's released v5 TopK SAEs (sparse_autoencoder/model.py, LN) and SAELens's layer_norm: the eps is added to
# std on the way in only; decoding multiplies by std itself.
LAYERNORM_EPS = 1e-5
# ENCODER_INIT_NORM (W_enc's initial row norm, imported above) carries its measured reason in lit_sae.sae.config.


class TopKSAE(UnitNormDecoder, nn.Module):
    """TopK sparse autoencoder.

    Args:
        d_in: width of the activations.
        n_latents: number of dictionary latents.
        k: active latents per token.
        k_aux: latents used by the AuxK loss (default d_in // 2, the paper's choice).
        auxk_coef: weight of the AuxK loss (1/32 in the paper).
        multi_topk: add L(multi_topk_factor * k) / 8 to the loss (the paper's Multi-TopK, factor 4).
        activation: ``topk`` (per token), ``batchtopk`` (k*B over the batch, threshold at inference),
            ``matryoshka_batchtopk`` (alias ``matryoshka``; BatchTopK whose prefixes each reconstruct x), ``relu``
            (+ L1) or ``jumprelu`` (a learned per-latent ``threshold``, z = relu(pre) * (pre > threshold), L0
            penalty); for the last two k is unused (pass any valid k). Objectives: ``lit_sae.sae.activations``.
        normalize: ``none``, ``scalar`` (one factor with E||x||^2 = d_in) or ``layernorm`` (per token).
        encoder_init_norm: row norm of W_enc at init (W_enc starts as the decoder's transpose times this; the
            paper ties them at 1.0, 0.5 measured better on short runs).
        fast: use the sparse custom-autograd kernels (False: the dense reference path, for checking).
        sparsity_coef: relu: weight of the normalised L1 ||z||_1 / ||x||_2; jumprelu: weight of the L0 (>= 0).
        sparsity_warmup_steps: the penalty ramps linearly from 0 over this many training steps (0: none).
        jumprelu_bandwidth: the STE's kernel width eps (Rajamanoharan et al.: 0.001).
        jumprelu_init_threshold: every latent's threshold at init (0.001, as Gemma Scope).
        matryoshka_prefixes: increasing prefix sizes of the dictionary for ``matryoshka_batchtopk`` (n_latents is
            added as the last prefix).

    Raises:
        ValueError: a setting that cannot train, naming its key (unknown activation, negative penalty or threshold).
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        k: int,
        *,
        k_aux: Optional[int] = None,
        auxk_coef: float = 1 / 32,
        multi_topk: bool = False,
        multi_topk_factor: int = 4,
        activation: Activation = "topk",
        normalize: Normalize = "none",
        encoder_init_norm: float = ENCODER_INIT_NORM,
        threshold_momentum: float = 0.99,
        fast: bool = True,
        sparsity_coef: float = 0.0,
        sparsity_warmup_steps: int = 0,
        jumprelu_bandwidth: float = activations.JUMPRELU_BANDWIDTH,
        jumprelu_init_threshold: float = activations.JUMPRELU_INIT_THRESHOLD,
        matryoshka_prefixes: Optional[list[int]] = None,
    ):
        super().__init__()
        activation = activations.canonical(activation)  # "matryoshka" -> "matryoshka_batchtopk"; did-you-mean
        activations.check_settings(activation, sparsity_coef, sparsity_warmup_steps, jumprelu_bandwidth,
                                   jumprelu_init_threshold, matryoshka_prefixes, n_latents)
        _check_config(d_in, n_latents, k, k_aux, activation, normalize, multi_topk, multi_topk_factor)
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        self.k_aux = min(k_aux if k_aux is not None else d_in // 2, n_latents)
        self.auxk_coef = auxk_coef
        self.multi_topk, self.multi_topk_factor = multi_topk, multi_topk_factor
        self.activation, self.normalize = activation, normalize
        self.threshold_momentum = threshold_momentum
        self.fast = fast
        # The data-parallel seam: how the losses' batch statistics are summed over ranks in training (LOCAL: one
        # process). Set by the trainer's side (``lit_sae.parallel.data_parallel``); evaluation always uses this batch
        # only.
        self.batch_sum: BatchSum = LOCAL
        self.sparsity_coef, self.sparsity_warmup_steps = sparsity_coef, sparsity_warmup_steps
        self.jumprelu_bandwidth, self.jumprelu_init_threshold = jumprelu_bandwidth, jumprelu_init_threshold
        prefixes = list(matryoshka_prefixes or [])
        self.matryoshka_prefixes = prefixes + ([n_latents] if prefixes and prefixes[-1] != n_latents else [])

        W_dec = draw_decoder(n_latents, d_in)
        # On the meta device (a latent-sharded fit builds the SAE there) nothing is drawn: the RNG state the draw
        # would have used is kept, so that each shard draws exactly its rows of this matrix (lit_sae.parallel).
        self.init_rng_state = torch.get_rng_state() if W_dec.is_meta else None
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone() * encoder_init_norm)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        # Estimated from data at the start of a fit; saved with the weights so a resume does not redo it.
        self.register_buffer("norm_scale", torch.ones(()))
        # batchtopk: one threshold (a running estimate); jumprelu: one per latent, learned; relu: 0 (unused by topk)
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.full((n_latents,), float(jumprelu_init_threshold)))
        else:
            self.register_buffer("threshold", torch.zeros(()))
        if activation in THRESHOLD_CODES:  # training steps taken, for the penalty's warm-up (saved: exact resume)
            self.register_buffer("sparsity_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("data_initialized", torch.zeros((), dtype=torch.bool))
        self.metadata: dict[str, Any] = {}  # where a loaded SAE came from (hook_name, model_name, ...)

    # ---------------------------------------------------------------- normalisation
    def normalize_input(self, x: Tensor) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
        """Map input-space activations (B, d_in) into the SAE's space; returns (x_n, state for ``denormalize``)."""
        if self.normalize == "scalar":
            return x * self.norm_scale, None
        if self.normalize == "layernorm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            return x / (std + LAYERNORM_EPS), (mu, std)
        return x, None

    def denormalize(self, x_n: Tensor, state: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """Inverse of ``normalize_input``; ``state`` is what it returned (needed for ``layernorm``)."""
        if self.normalize == "scalar":
            return x_n / self.norm_scale
        if self.normalize == "layernorm":
            if state is None:
                raise ValueError("normalize='layernorm' needs the (mu, std) state returned by normalize_input")
            mu, std = state
            return x_n * std + mu
        return x_n

    @torch.no_grad()
    def init_from_data_(self, sample: Tensor) -> None:
        """Set the normalisation scale and b_pre (geometric median) from a sample (N, d_in) of activations.

        Raises:
            ValueError: ``sample`` is not a floating (N, d_in) tensor with N >= 1 (nothing is changed)."""
        check_acts(sample, self.d_in, "sample")
        if sample.shape[0] == 0:
            raise ValueError("sample: expected at least one row of shape (N, d_in), got 0 rows")
        sample = sample.to(self.W_dec.device, torch.float32)
        if self.normalize == "scalar":
            mean_sq = sample.double().pow(2).sum(dim=1).mean()
            self.norm_scale.fill_(math.sqrt(self.d_in / float(mean_sq)))
        x_n, _ = self.normalize_input(sample)
        self.b_pre.copy_(geometric_median(x_n))
        self.data_initialized.fill_(True)

    # ---------------------------------------------------------------- encode / decode
    def pre_acts(self, x: Tensor) -> Tensor:
        """Dense pre-activations (B, n_latents) of input-space ``x``; for analysis only, training never builds them."""
        check_acts(x, self.d_in)
        x_n, _ = self.normalize_input(x)
        return (x_n - self.b_pre) @ self.W_enc.T + self.b_enc

    def encode(self, x: Tensor, return_info: bool = False):
        """Sparse code of input-space ``x`` (B, d_in): (values (B, k), indices (B, k) int64), ReLU applied.

        ``return_info=True`` adds a third element, the normalisation state ``decode`` needs to undo a ``layernorm``
        input normalisation (OpenAI's ``encode -> (latents, info)``): ``decode(*sae.encode(x, True))`` is the
        reconstruction for every normalisation. For threshold activations (batchtopk at inference, relu, jumprelu)
        k is the batch's largest count of active latents and rows are zero-padded.

        Raises:
            ValueError: ``x`` is not a floating (B, d_in) tensor."""
        check_acts(x, self.d_in)
        x_n, info = self.normalize_input(x)
        values, indices, *_ = self._encode_n(x_n, None)
        return (values, indices, info) if return_info else (values, indices)

    def decode(self, values: Tensor, indices: Tensor, info=None) -> Tensor:
        """x_hat (B, d_in) in input space = sum_i values_i W_dec[indices_i] + b_pre, normalisation undone (``info``:
        what ``encode(x, return_info=True)`` returned; required for ``layernorm``).

        Raises:
            ValueError: shapes differ, wrong dtypes."""
        check_code(values, indices, self.n_latents)
        return self.denormalize(self._decode_n(values, indices) + self.b_pre, info)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)) in input space, (B, d_in) in the SAE's dtype and device."""
        return self.decode(*self.encode(x, return_info=True))

    def _decode_n(self, values: Tensor, indices: Tensor) -> Tensor:
        decode = kernels.sparse_decode if self.fast else kernels.naive_sparse_decode
        return decode(values, indices, self.W_dec)

    def _decode_sets_n(self, codes: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """``[_decode_n(v, i) for v, i in codes]``; the fast path shares one backward among them."""
        if self.fast:
            return kernels.sparse_decode_sets(codes, self.W_dec)
        return [kernels.naive_sparse_decode(v, i, self.W_dec) for v, i in codes]

    def _encode_n(self, x_n: Tensor, dead_mask: Optional[Tensor], gather: Optional[BatchSum] = None):
        """Returns (values, indices, multi_values, multi_indices, aux_values, aux_indices, sparsity_loss) in the SAE's
        space (sparsity_loss: None but for relu / jumprelu). ``gather`` (a ``BatchSum`` that gathers, topk only):
        the code of every data-parallel rank's rows, in token order."""
        if gather is not None and (self.activation != "topk" or not self.fast):
            raise ValueError(f"gathering the ranks' codes needs activation='topk' and fast kernels, not "
                             f"{self.activation!r} (fast={self.fast})")
        use_aux = dead_mask is not None and self.auxk_coef > 0
        if self.activation in THRESHOLD_CODES:
            pre = (x_n - self.b_pre) @ self.W_enc.T + self.b_enc
            values, indices, sparsity = activations.threshold_encode(
                pre, x_n, self.activation, self.threshold, self.jumprelu_bandwidth)
            return values, indices, None, None, None, None, sparsity
        if self.activation in ("batchtopk", "matryoshka_batchtopk"):
            pre = (x_n - self.b_pre) @ self.W_enc.T + self.b_enc
            return (*activations.batchtopk_encode(pre, self.k, self.threshold, self.threshold_momentum, self.training,
                                                  dead_mask if use_aux else None, self.k_aux), None)
        encode = kernels.topk_encode if self.fast else kernels.naive_topk_encode
        out = encode(
            x_n,
            self.W_enc,
            self.b_enc,
            self.k,
            k_multi=self.k * self.multi_topk_factor if self.multi_topk else 0,
            k_aux=self.k_aux if use_aux else 0,
            dead_mask=dead_mask if use_aux else None,
            b_pre=self.b_pre,
            **({"gather": gather} if gather is not None else {}),
        )
        return out.values, out.indices, out.multi_values, out.multi_indices, out.aux_values, out.aux_indices, None

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, dead_mask: Optional[Tensor] = None) -> SAEOutput:
        """Encode, decode and compute the losses of ``x`` (B, d_in); ``dead_mask`` (n_latents,) bool enables AuxK.

        Raises:
            ValueError: ``x`` is not a floating (B, d_in) tensor or ``dead_mask`` not a (n_latents,) bool tensor,
                checked before anything (e.g. the batchtopk threshold) is updated."""
        check_acts(x, self.d_in)
        if dead_mask is not None:
            check_mask(dead_mask, self.W_enc.shape[0])  # the latents this module holds (a shard's, when sharded)
        # fp16/bf16 data is promoted to the weights' dtype; autocast still runs the products in low precision
        x_n, state = self.normalize_input(x.to(self.W_dec.dtype))
        out = self._objective(x_n, x_n, self.b_pre, dead_mask)
        return out._replace(x_hat=self.denormalize(out.x_hat, state))

    def _objective(self, x_n: Tensor, target_n: Tensor, base: Tensor, dead_mask: Optional[Tensor]) -> SAEOutput:
        """Encode ``x_n`` (B, d_in), reconstruct ``target_n`` (B, d_out) as ``base`` + the decoded code, and the
        losses, all in the SAE's space. An SAE passes (x_n, x_n, b_pre); a transcoder its target and b_dec (+ skip).
        The returned ``x_hat`` is still in the SAE's space."""
        bs = self.batch_sum if self.training else LOCAL  # eval ranks may hold unequal batch counts: no collectives
        gather = bs if bs.gathers else None
        if gather is not None and base.dim() != 1:
            raise ValueError("gathering the data-parallel ranks' rows needs a per-latent base (b_pre), not a "
                             "per-token one")
        args = (x_n, dead_mask) if gather is None else (x_n, dead_mask, gather)
        values, indices, multi_values, multi_indices, aux_values, aux_indices, sparsity = self._encode_n(*args)
        if gather is not None:  # from here on, the global batch's step on every rank
            target_n, bs = gather.gather(target_n), LOCAL
        matryoshka = self.activation == "matryoshka_batchtopk" and self.training
        # Every code is decoded in one call (one W_dec gradient for all in the fast path): the k-code (matryoshka
        # decodes its prefixes itself); Multi-TopK's extra 3k (the first k of the top-4k are the top-k: only the
        # others are decoded and added); AuxK's code.
        codes = [] if matryoshka else [(values, indices)]
        if multi_values is not None:
            codes.append((multi_values[:, self.k:].contiguous(), multi_indices[:, self.k:].contiguous()))
        if aux_values is not None:
            codes.append((aux_values, aux_indices))
        decoded = self._decode_sets_n(codes) if codes else []
        if matryoshka:
            prefix_nmse, recon_n = activations.matryoshka_nmse(self._decode_n, values, indices, base, target_n,
                                                               self.matryoshka_prefixes)
            decoded.insert(0, None)
        else:
            recon_n = (decoded[0] + base).to(target_n.dtype)
            prefix_nmse = None
        nmse = normalized_mse(recon_n, target_n, bs)
        zero = nmse.new_zeros(())
        multik = zero
        if multi_values is not None:
            multik = normalized_mse(recon_n + decoded[1].to(target_n.dtype), target_n, bs)
        # the base (b_pre) stays out of the auxiliary reconstruction: it explains the residual x - x_hat, not x.
        aux_recon = None if aux_values is None else decoded[-1].to(target_n.dtype)
        aux = auxk_loss(aux_recon, (target_n - recon_n).detach(), bs)
        loss = (nmse if prefix_nmse is None else prefix_nmse) + multik / 8 + self.auxk_coef * aux
        if sparsity is not None:
            step = int(self.sparsity_step)
            loss = loss + self.sparsity_coef * activations.warmup_factor(step, self.sparsity_warmup_steps) * sparsity
            if self.training and torch.is_grad_enabled():
                self.sparsity_step += 1
        mse = (recon_n - target_n).pow(2).mean()
        if gather is not None:  # the losses are the global batch's; the code and reconstruction, this rank's rows
            recon_n, values, indices = (gather.own_rows(t) for t in (recon_n, values, indices))
        return SAEOutput(recon_n, values, indices, loss, mse, nmse, aux, multik, sparsity)

    # ---------------------------------------------------------------- save / load (SAELens's layout)
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this SAE's shapes and computation (``TopKSAE(**sae.config())``):
        the fields of ``lit_sae.sae.config.SAEConfig`` in ``REBUILD_KEYS``."""
        cfg = {key: getattr(self, key) for key in REBUILD_KEYS}
        cfg["matryoshka_prefixes"] = cfg["matryoshka_prefixes"] or None
        return cfg

    def save_pretrained(self, path: str | Path, metadata: Optional[dict[str, Any]] = None, *,
                        lit_sae: Optional[dict[str, Any]] = None, overwrite: bool = False) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` in SAELens's layout (``lit_sae.sae.io.save_pretrained``:
        the arguments, the folding of the input scale, and the errors raised)."""
        from lit_sae.sae import io as sae_io

        return sae_io.save_pretrained(self, path, metadata, lit_sae=lit_sae, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TopKSAE":
        """Load a SAELens-layout folder (lit-sae's export, or SAELens's topk / standard / jumprelu / batchtopk) in
        eval mode (``lit_sae.sae.io.load_pretrained``)."""
        from lit_sae.sae import io as sae_io

        return sae_io.load_pretrained(cls, path)

    @classmethod
    def from_state(cls, kwargs: dict[str, Any], state: dict[str, Tensor], metadata: Optional[dict] = None
                   ) -> "TopKSAE":
        """A ``TopKSAE(**kwargs)`` holding ``state``, in eval mode (``lit_sae.sae.io.from_state``)."""
        from lit_sae.sae import io as sae_io

        return sae_io.from_state(cls, kwargs, state, metadata)


def _check_config(d_in, n_latents, k, k_aux, activation, normalize, multi_topk, multi_topk_factor) -> None:
    """Reject settings that cannot train, with the key's name and a fix."""
    if d_in <= 0 or n_latents <= 0:
        raise ValueError(f"d_in ({d_in}) and n_latents ({n_latents}) must be positive")
    if not 0 < k <= n_latents:
        raise ValueError(f"k={k} must satisfy 0 < k <= n_latents={n_latents}: choose a k in that range")
    if k_aux is not None and k_aux <= 0:
        raise ValueError(f"k_aux={k_aux} must be positive (or null for the default d_in // 2)")
    if normalize not in ("none", "scalar", "layernorm"):
        raise ValueError(f"normalize={normalize!r}: use 'none', 'scalar' or 'layernorm'")
    if multi_topk and activation != "topk":
        raise ValueError("multi_topk is only defined for activation='topk'")
    if multi_topk and k * multi_topk_factor > n_latents:
        raise ValueError(f"multi_topk needs k * {multi_topk_factor} <= n_latents ({n_latents}); lower k or disable it")
