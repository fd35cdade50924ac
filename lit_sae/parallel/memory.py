"""Per-device memory of training a TopK SAE, by component, for a (data x tensor)-parallel layout.

A model of what ``TopKSAE``/``ShardedTopKSAE`` with the fast kernels and Adam hold at the step's peak (validated
against measured peak memory on CPU by ``scripts/plan_memory.py --validate``). Sizes in bytes, per device:

    weights      W_enc, W_dec (n/T x d each), b_enc (n/T), b_pre (d), in the parameter dtype
    gradients    the same again (the sparse backward writes them directly; nothing dense of size B x n)
    adam         two moments per parameter (exp_avg, exp_avg_sq), in the parameter dtype
    ema          one more copy of the parameters when ``ema`` is on
    preact       the encoder's pre-activation chunk: rows x n/T in the compute dtype, rows = the per-device batch
                 or fewer so that it stays under ``kernels.preact_budget(device)`` (plus its dead columns for AuxK,
                 ``dead_fraction`` of them; on CUDA in bf16 the exact top-k's tie repair adds up to 7/16 of the chunk)
    batch        ``ACT_COPIES`` (B x d) activations alive during the step (input, centred input, reconstructions,
                 residuals, their gradients) in the compute dtype, and the (B x K x T) selection candidates, where B
                 is the global batch: the data-parallel ranks gather their codes and each computes the rest of the
                 step on the whole batch (``data_parallel.TokenGather``), only the encoder product is per rank (B/D);
                 with ``gathers=False`` (summed statistics, ``GroupSum``) everything is B/D

The preact chunk is freed before backward allocates gradients, so the peak is
weights + adam + ema + batch + max(preact, gradients).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lit_sae.sae.kernels import preact_budget

ACT_COPIES = 16  # (B, d) tensors alive at the peak: TopKSAE.forward keeps about 14 for backward with AuxK and
# Multi-TopK on (centred input, reconstructions, residuals, differences), plus gradients in flight; 8 (the count
# without AuxK/Multi-TopK) under-predicted the measured CPU peaks by 4-14%, 16 is within 10% (plan_memory.py --validate)
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float64": 8}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device by component (see the module docstring), and the peak."""

    weights: int
    gradients: int
    adam: int
    ema: int
    preact: int
    batch: int

    @property
    def peak(self) -> int:
        return self.weights + self.adam + self.ema + self.batch + max(self.preact, self.gradients)

    def as_dict(self) -> dict[str, int]:
        return asdict(self) | {"peak": self.peak}


def plan_memory(d_in: int, n_latents: int, k: int, batch_size_tokens: int, *, data_parallel_size: int = 1,
                tensor_parallel_size: int = 1, param_dtype: str = "float32", compute_dtype: str = "float32",
                multi_topk_factor: int = 1, ema: bool = False, dead_fraction: float = 0.0,
                batch_is_global: bool = True, device: str = "cpu", gathers: bool = True) -> MemoryPlan:
    """Memory per device of one training step.

    Args:
        d_in, n_latents, k: the SAE. ``multi_topk_factor``: 4 with Multi-TopK (K = 4k candidates), else 1.
        batch_size_tokens: tokens per step, global (``batch_is_global``) or per data-parallel rank.
        data_parallel_size, tensor_parallel_size: the mesh (D x T devices); every tensor-parallel rank holds its
            data-parallel rank's whole batch.
        param_dtype: parameters, gradients and Adam moments (float32 in lit-sae: bf16-mixed keeps fp32 masters).
        compute_dtype: pre-activations and activations (bfloat16 under bf16-mixed).
        dead_fraction: fraction of latents dead (AuxK selects among a copy of their pre-activation columns).
        device: "cpu" or "cuda": the pre-activation chunk's budget differs (``kernels.preact_budget``).
        gathers: the data-parallel ranks gather their codes (what a TopK fit does: the step's activations are the
            global batch's on every rank) or sum statistics (other objectives: each rank's share).

    Raises:
        ValueError: n_latents not divisible by tensor_parallel_size, or a batch that does not split over the
        data-parallel ranks (names the values).
    """
    D, T = data_parallel_size, tensor_parallel_size
    if n_latents % T:
        raise ValueError(f"n_latents={n_latents} is not divisible by tensor_parallel_size={T}")
    if batch_is_global and batch_size_tokens % D:
        raise ValueError(f"batch_size_tokens={batch_size_tokens} does not split over data_parallel_size={D}")
    p, c = DTYPE_BYTES[param_dtype], DTYPE_BYTES[compute_dtype]
    n_l = n_latents // T
    b = batch_size_tokens // D if batch_is_global else batch_size_tokens
    params = (2 * n_l * d_in + n_l + d_in) * p
    rows = min(b, max(1, preact_budget(device) // (n_l * c)))
    preact = rows * n_l * c + (rows * int(n_l * dead_fraction) * c if dead_fraction else 0)
    K = k * multi_topk_factor
    step_rows = b * D if gathers else b  # rows of the activations after the encoder product
    candidates = step_rows * min(K, n_l) * T * (c + 8) * 2  # gathered (values, indices), sorted copy
    batch = ACT_COPIES * step_rows * d_in * c + candidates
    return MemoryPlan(weights=params, gradients=params, adam=2 * params, ema=params if ema else 0, preact=preact,
                      batch=batch)


def gpus_needed(d_in: int, n_latents: int, k: int, batch_size_tokens: int, device_bytes: int, **kwargs) -> int:
    """Smallest tensor-parallel size (a power of two dividing n_latents) whose per-device peak fits ``device_bytes``
    with 10% kept free; the batch is per data-parallel rank here. Raises ValueError if none up to 1024 fits."""
    T = 1
    while T <= 1024:
        if n_latents % T == 0:
            plan = plan_memory(d_in, n_latents, k, batch_size_tokens, tensor_parallel_size=T, batch_is_global=False,
                               **kwargs)
            if plan.peak <= 0.9 * device_bytes:
                return T
        T *= 2
    raise ValueError(f"no tensor-parallel size up to 1024 fits n_latents={n_latents} in {device_bytes} bytes")
