"""SAEBench's core metrics, with SAEBench's names and definitions, so lit-sae's numbers sit beside SAEBench results.

Source: adamkarvonen/SAEBench, ``sae_bench/evals/core/main.py`` (``get_sparsity_and_variance_metrics``,
``get_downstream_reconstruction_metrics``, ``get_featurewise_weight_based_metrics``, ``calculate_max_cosine_sim``,
``calculate_misc_metrics``) and ``eval_output.py`` (the metric groups). Per token t with input x_t, reconstruction
x̂_t (both (d_in,)) and latent activations z_t:

    explained_variance   1 - E_t||x_t - x̂_t||^2 / E_t||x_t - E[x]||^2     (mean over all evaluated tokens; the
                         "conventional" definition of SAEBench commit 7fb3ed3; the later batched code squares x
                         before averaging it per dimension, which is not a variance: lit-sae keeps the definition)
    mse                  E_t ||x_t - x̂_t||^2 / B     (SAEBench divides each token's squared error by its batch's
                         token count B: the value depends on the batch size, recorded as ``batch_tokens``)
    cossim               E_t cos(x_t, x̂_t)
    l2_norm_in/out       E_t ||x_t||, E_t ||x̂_t||;   l2_ratio  E_t ||x̂_t|| / ||x_t|| (a norm < 1e-4 divides by 1)
    relative_reconstruction_bias   mean over batches of  E_b||x̂||^2 / E_b<x, x̂>   (Marks et al. 2024, eq. 10)
    l0, l1               E_t #{i: z_ti != 0},  E_t sum_i z_ti
    feature_density_i    fraction of tokens with z_ti > 0;  frac_alive = mean_i [density_i > 0]
    freq_over_1_percent  mean_i [density_i > 0.01] (10%: 0.1); normalized_*: sum of those densities / sum of all
    average_max_encoder_cosine_sim   mean_i max_{j != i} cos(W_enc_i, W_enc_j)   (decoder: the same on W_dec rows)
    ce_loss_score        (CE_ablation - CE_sae) / (CE_ablation - CE_clean), ablation = the hook zeroed
    kl_div_score         (KL_ablation - KL_sae) / KL_ablation, KL(clean || patched) per token

The CE/KL numbers come from lit-sae's downstream evaluation (``lit_sae.eval.downstream``): the SAE is spliced at the
positions lit-sae evaluates (not position 0, no norm outliers), where SAEBench splices every position of its own
dataset's contexts; the section's ``notes`` say so.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["CoreMetrics", "max_cosine_sims", "misc_metrics", "downstream_groups", "saebench_core_section",
           "saebench_section", "saebench_markdown"]

SOURCE = "adamkarvonen/SAEBench sae_bench/evals/core/main.py"


class CoreMetrics(Metric):
    """SAEBench core's reconstruction_quality, shrinkage and sparsity groups and per-latent densities, accumulated
    over batches of (x, x_hat, latent_values, latent_indices); sums in float64, summed across DDP ranks.

    ``update(x (B, d_in), x_hat (B, d_in), latent_values (B, k), latent_indices (B, k) int64)``: one evaluation
    batch (rows zero-padded with value 0 are not counted as active). ``compute()`` returns
    ``{"reconstruction_quality", "shrinkage", "sparsity", "feature_density" (n_latents,), "token_stats"}``.
    """

    full_state_update = False

    def __init__(self, n_latents: int, d_in: int, **kwargs: Any):
        super().__init__(**kwargs)
        f64 = torch.float64
        for name in ("tokens", "batches", "sum_sq_norm", "sum_resid", "sum_mse", "sum_cossim", "sum_l2_in",
                     "sum_l2_out", "sum_l2_ratio", "sum_rrb", "sum_l0", "sum_l1", "max_batch_tokens"):
            self.add_state(name, torch.zeros((), dtype=f64), dist_reduce_fx="max" if name == "max_batch_tokens"
                           else "sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=f64), dist_reduce_fx="sum")
        self.add_state("fired", torch.zeros(n_latents, dtype=f64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor, latent_values: Tensor, latent_indices: Tensor) -> None:
        if x.shape != x_hat.shape or x.dim() != 2 or latent_values.shape != latent_indices.shape:
            raise ValueError(f"CoreMetrics.update: expected x, x_hat (B, d_in) and latent values/indices (B, k); "
                             f"got {tuple(x.shape)}, {tuple(x_hat.shape)}, {tuple(latent_values.shape)}, "
                             f"{tuple(latent_indices.shape)}")
        if x.shape[0] == 0:
            return
        x, x_hat, v = x.double(), x_hat.double(), latent_values.double()
        B = x.shape[0]
        resid = (x - x_hat).pow(2).sum(-1)
        n_in, n_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        dot = (x * x_hat).sum(-1)
        self.tokens += B
        self.batches += 1
        self.max_batch_tokens.fill_(max(float(self.max_batch_tokens), float(B)))
        self.sum_x += x.sum(0)
        self.sum_sq_norm += x.pow(2).sum()
        self.sum_resid += resid.sum()
        self.sum_mse += (resid / B).sum()
        self.sum_cossim += (dot / (n_in * n_out)).sum()
        self.sum_l2_in += n_in.sum()
        self.sum_l2_out += n_out.sum()
        self.sum_l2_ratio += (n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in)).sum()
        self.sum_rrb += n_out.pow(2).mean() / dot.mean()
        self.sum_l0 += (v != 0).sum()
        self.sum_l1 += v.sum()
        active = v > 0
        self.fired.index_add_(0, latent_indices[active], torch.ones_like(v[active]))

    def compute(self) -> dict[str, Any]:
        n = self.tokens.clamp_min(1)
        mean = self.sum_x / n
        total_var = self.sum_sq_norm / n - mean.pow(2).sum()
        return {
            "reconstruction_quality": {"explained_variance": float(1 - (self.sum_resid / n) / total_var),
                                       "mse": float(self.sum_mse / n), "cossim": float(self.sum_cossim / n)},
            "shrinkage": {"l2_norm_in": float(self.sum_l2_in / n), "l2_norm_out": float(self.sum_l2_out / n),
                          "l2_ratio": float(self.sum_l2_ratio / n),
                          "relative_reconstruction_bias": float(self.sum_rrb / self.batches.clamp_min(1))},
            "sparsity": {"l0": float(self.sum_l0 / n), "l1": float(self.sum_l1 / n)},
            "feature_density": (self.fired / n).float().cpu(),
            "token_stats": {"total_tokens_eval_sparsity_variance": int(self.tokens),
                            "batch_tokens": int(self.max_batch_tokens)},
        }


@torch.no_grad()
def max_cosine_sims(vectors: Tensor, chunk: int = 1024) -> Tensor:
    """(F,) largest cosine similarity of each row of ``vectors`` (F, D) with any other row (SAEBench's
    ``calculate_max_cosine_sim`` on W_enc's columns / W_dec's rows), computed in chunks of rows."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    out = torch.empty(unit.shape[0], dtype=torch.float64, device=unit.device)
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start : start + chunk] @ unit.T
        rows = torch.arange(sims.shape[0], device=unit.device)
        sims[rows, rows + start] = float("-inf")
        out[start : start + chunk] = sims.max(dim=1).values
    return out


def misc_metrics(feature_density: Tensor, W_enc: Tensor, W_dec: Tensor) -> dict[str, float]:
    """SAEBench's ``misc_metrics`` group from per-latent densities (n_latents,) and the weights (rows = latents)."""
    d = feature_density.double()
    total = float(d.sum())

    def normalized(threshold: float) -> float:
        return float(d[d > threshold].sum()) / total if total > 0 else 0.0

    return {
        "average_max_encoder_cosine_sim": float(max_cosine_sims(W_enc).mean()),
        "average_max_decoder_cosine_sim": float(max_cosine_sims(W_dec).mean()),
        "frac_alive": float((d > 0).double().mean()),
        "freq_over_1_percent": float((d > 0.01).double().mean()),
        "freq_over_10_percent": float((d > 0.1).double().mean()),
        "normalized_freq_over_1_percent": normalized(0.01),
        "normalized_freq_over_10_percent": normalized(0.1),
    }


def downstream_groups(downstream: dict[str, Any]) -> dict[str, dict[str, float]]:
    """SAEBench's model_behavior_preservation and model_performance_preservation groups from lit-sae's downstream
    result (clean_ce, sae_ce, zero_ce, kl_sae, kl_zero: per-token means in nats)."""
    ce_clean, ce_sae, ce_zero = downstream["clean_ce"], downstream["sae_ce"], downstream["zero_ce"]
    kl_sae, kl_zero = downstream["kl_sae"], downstream["kl_zero"]
    return {
        "model_behavior_preservation": {"kl_div_score": (kl_zero - kl_sae) / kl_zero,
                                        "kl_div_with_ablation": kl_zero, "kl_div_with_sae": kl_sae},
        "model_performance_preservation": {"ce_loss_score": (ce_zero - ce_sae) / (ce_zero - ce_clean),
                                           "ce_loss_with_ablation": ce_zero, "ce_loss_with_sae": ce_sae,
                                           "ce_loss_without_sae": ce_clean},
    }


def saebench_core_section(core: dict[str, Any], W_enc: Tensor, W_dec: Tensor,
                          downstream: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The report's ``saebench_core`` section, shaped like SAEBench core's ``eval_result_metrics`` (metric groups):
    ``core`` is ``CoreMetrics.compute()``; ``downstream`` lit-sae's downstream result (None: those groups are left
    out, as SAEBench drops empty groups)."""
    section: dict[str, Any] = {}
    if downstream and all(key in downstream for key in ("zero_ce", "kl_zero")):
        section.update(downstream_groups(downstream))
    section.update({key: core[key] for key in ("reconstruction_quality", "shrinkage", "sparsity")})
    section["token_stats"] = dict(core["token_stats"])
    if downstream and "n_tokens" in downstream:
        section["token_stats"]["total_tokens_eval_reconstruction"] = downstream["n_tokens"]
    section["misc_metrics"] = misc_metrics(core["feature_density"], W_enc, W_dec)
    section["notes"] = (f"definitions of {SOURCE}; sparsity/variance on lit-sae's test split; CE/KL on lit-sae's "
                        "held-out contexts with the SAE spliced where lit-sae evaluates (not position 0, no norm "
                        "outliers); mse depends on token_stats.batch_tokens as in SAEBench")
    return section


def saebench_section(core: dict[str, Any], sae, downstream: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The report integration: ``saebench_core_section`` for an SAE with ``W_enc`` / ``W_dec`` (rows = latents)."""
    return saebench_core_section(core, sae.W_enc.detach().cpu(), sae.W_dec.detach().cpu(), downstream)


def saebench_markdown(section: Optional[dict[str, Any]]) -> list[str]:
    """Markdown lines (a table per metric group) for the report's ``saebench_core`` section ([] when absent)."""
    if not section:
        return []
    lines = ["## SAEBench core metrics (SAEBench's names and definitions)", "", "| group | metric | value |",
             "|---|---|---|"]
    for group, metrics in section.items():
        if isinstance(metrics, dict):
            lines += [f"| {group} | {name} | {value:.6g} |" if isinstance(value, float) else
                      f"| {group} | {name} | {value} |" for name, value in metrics.items()]
    return lines + ["", str(section.get("notes", "")), ""]
