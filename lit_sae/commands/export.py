"""``lit-sae export CKPT --out DIR``."""

from __future__ import annotations


def export(ckpt: str, *, out: str) -> str:
    """Export a checkpoint's SAE (its EMA weights when EMA was on) as cfg.json + sae_weights.safetensors.

    The layout is SAELens's (``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_in), ``b_dec``); a scalar input
    scale is folded into the weights, so the export takes raw activations.

    Args:
        ckpt: a checkpoint written by ``lit-sae fit`` (e.g. ``runs/demo/checkpoints/last.ckpt``).
        out: the output folder.

    Returns:
        The export folder.

    Raises:
        FileNotFoundError: ``ckpt`` does not exist.
    """
    from lit_sae.export import export_checkpoint

    return str(export_checkpoint(ckpt, out))
