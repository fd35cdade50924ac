"""A ``TopKSAE`` saves and loads itself in SAELens's layout: ``cfg.json`` + ``sae_weights.safetensors``.

The methods ``TopKSAE.save_pretrained`` / ``from_pretrained`` / ``from_state`` call these functions; the layout's
details (field names, folding, supported architectures) live in ``lit_sae.formats.saelens``. Like sparsify's
``SparseCoder.save_to_disk`` / ``load_from_disk``: the model owns its files, no Lightning involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, TypeVar

import torch
from torch import Tensor, nn

from lit_sae.safe_io import dumps_json

# The SAE class: ``lit_sae.sae.model.TopKSAE`` (or a subclass), which calls these functions; this module sits
# below it and names it only through the type variable (the model imports io, never the reverse).
SAE = TypeVar("SAE", bound=nn.Module)

__all__ = ["from_state", "load_pretrained", "save_pretrained"]


def save_pretrained(sae: nn.Module, path: str | Path, metadata: Optional[dict[str, Any]] = None, *,
                    lit_sae: Optional[dict[str, Any]] = None, overwrite: bool = False) -> Path:
    """Write ``sae`` (a ``TopKSAE``: its ``config()`` and state dict) as ``cfg.json`` + ``sae_weights.safetensors``
    (SAELens's layout, ``lit_sae.formats.saelens``).

    The saved SAE takes raw activations: a ``scalar`` input scale is folded into the weights and decoder rows
    are made unit norm (see ``lit_sae.formats.common.fold_for_export``; a deviation is recorded in the
    ``lit_sae`` section of cfg.json). ``metadata``: SAELens's fields (hook_name, model_name, context_size,
    prepend_bos, dataset_path, ...); ``lit_sae``: extra entries for lit-sae's own section. The folder is
    written all at once with the user's umask. Returns the folder. Raises ValueError if ``path`` holds anything and
    ``overwrite`` is False, or holds files that are not a lit-sae export."""
    from safetensors.torch import save

    from lit_sae.formats import saelens
    from lit_sae.formats.common import write_folder

    tensors, cfg = saelens.to_saelens(sae.config(), sae.state_dict(), metadata, lit_sae)
    return write_folder(path, {saelens.CONFIG: dumps_json(cfg, where=f"{path}/{saelens.CONFIG}", indent=2).encode(),
                               saelens.WEIGHTS: save(tensors)}, overwrite=overwrite)


def load_pretrained(cls: type[SAE], path: str | Path) -> SAE:
    """Load a SAELens-layout folder (lit-sae's own export or one SAELens saved: topk, standard, jumprelu,
    batchtopk) as a ``cls`` in eval mode whose reconstruction equals SAELens's. Its SAELens metadata is in
    ``sae.metadata``. Raises FileNotFoundError (a missing file) or ValueError naming the unsupported field."""
    from lit_sae.formats import saelens

    cfg, tensors = saelens.read_folder(path)
    kwargs, state, meta = saelens.from_saelens(cfg, tensors, Path(path) / saelens.CONFIG)
    return from_state(cls, kwargs, state, meta)


def from_state(cls: type[SAE], kwargs: dict[str, Any], state: dict[str, Tensor],
               metadata: Optional[dict] = None) -> SAE:
    """A ``cls(**kwargs)`` holding ``state`` (W_enc, b_enc, W_dec, b_pre; optional threshold, norm_scale), marked
    data-initialised, in eval mode, in the state's dtype; ``metadata`` is kept as ``sae.metadata``."""
    sae = cls(**kwargs)
    full = sae.state_dict()
    for name, value in state.items():
        full[name] = value.reshape(full[name].shape) if full[name].numel() == value.numel() else value
    full["data_initialized"] = torch.ones((), dtype=torch.bool)
    dtype = state["W_dec"].dtype
    sae.to(dtype).load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()})
    sae.metadata = dict(metadata or {})
    return sae.eval()
