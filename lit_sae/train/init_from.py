"""``model.init_from``: start ``SAEModule`` from an existing SAE (anything ``lit_sae.load_sae`` reads), checked
against the module's hook point and shapes."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def load_init_from(module, path: str) -> None:
    """Replace ``module.sae`` by the SAE at ``path``; ValueError naming the model keys that differ from the file."""
    from lit_sae.artifacts.load import load_sae

    sae = load_sae(path)
    hook = sae.metadata.get("hook_name")
    if not hook:
        log.warning("%s names no hook point: make sure it was trained on %s", path, module.hparams.hook_point)
    elif module.hparams.hook_point and hook != module.hparams.hook_point:
        raise ValueError(f"{path}: the SAE was trained on hook point {hook!r}, the data holds "
                         f"{module.hparams.hook_point!r}: harvest shards at {hook!r} (or load an SAE of that hook)")
    mine = {"d_in": module.sae.d_in, "n_latents": module.sae.n_latents, "transcoder": module.hparams.transcoder,
            "d_out": getattr(module.sae, "d_out", None), "skip": getattr(module.sae, "skip", None)}
    theirs = {"d_in": sae.d_in, "n_latents": sae.n_latents, "transcoder": hasattr(sae, "d_out"),
              "d_out": getattr(sae, "d_out", None), "skip": getattr(sae, "skip", None)}
    if sae.activation == "topk":
        mine["k"], theirs["k"] = module.sae.k, sae.k
    diff = {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}
    if diff:
        hint = " (d_in comes from the data: use shards of the SAE's width)" if "d_in" in diff else ""
        raise ValueError(f"{path}: the SAE differs from the model config in {diff} (config, file){hint}; set "
                         "these model keys to the file's values")
    module.sae = sae.float().train(module.training)
