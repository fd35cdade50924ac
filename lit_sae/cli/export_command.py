"""``lit-sae export CKPT --out DIR [--format saelens|sparsify|openai|circuit-tracer] [--overwrite]``."""

from __future__ import annotations

from typing import Literal, Optional


def export(ckpt: str, *, out: str, format: Literal["saelens", "sparsify", "openai", "circuit-tracer"] = "saelens",
           overwrite: bool = False, manifest: Optional[str] = None) -> str:
    """Export a checkpoint's SAE (its EMA weights when EMA was on) for SAELens (default), sparsify or OpenAI's layout.

    ``saelens``: cfg.json + sae_weights.safetensors (``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_in),
    ``b_dec``; a scalar input scale is folded into the weights, so the export takes raw activations).
    ``sparsify``: ``<hookpoint>/cfg.json`` + ``sae.safetensors``. ``openai``: ``sae.pt`` (topk SAEs only).
    cfg.json records the checkpoint's sha256, step and tokens seen, and the shards' manifest hash.

    Args:
        ckpt: a checkpoint written by ``lit-sae fit`` (e.g. ``runs/demo/checkpoints/last.ckpt``); the checkpoint
            folder of a latent-sharded fit (``SAEModelParallelStrategy``: one file per rank) is reassembled into one
            SAE in this process (no process group needed).
        out: the output folder; it must be new or empty unless ``--overwrite``.
        format: the layout to write.
        overwrite: replace an earlier export in ``out`` (a folder holding other files is never touched).
        manifest: the shards' manifest.json, when it is no longer where the checkpoint's data path says.

    Returns:
        The export folder.

    Raises:
        FileNotFoundError: ``ckpt`` does not exist.
        ValueError: ``out`` exists without ``--overwrite`` or holds other files; the format cannot express the SAE.
    """
    from lit_sae.artifacts.export import export as run

    return str(run(ckpt, out, format=format, overwrite=overwrite, manifest=manifest))
