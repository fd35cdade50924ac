"""``SAEModule``'s export at the end of fit: the trained SAE (EMA weights when on) written in SAELens's layout to the
run's export folder."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from lit_sae.parallel.sharding import export_at_fit_end, is_sharded
from lit_sae.train.runs import export_dir

log = logging.getLogger(__name__)


def export_trained(module) -> None:
    """Export ``module``'s SAE to ``model.export_dir`` (default ``<trainer.default_root_dir>/sae``; ``none``: off):
    from the final checkpoint by the function ``lit-sae export`` runs (the same files and provenance: checkpoint and
    manifest sha256, context size, BOS, dataset) when ``last.ckpt`` was written at the last step; from the weights in
    memory otherwise (a latent-sharded SAE gathered from its ranks first)."""
    hparams, trainer = module.hparams, module.trainer
    if hparams.export_dir == "none":
        return
    out = Path(hparams.export_dir or export_dir(trainer.default_root_dir))
    from lit_sae.artifacts.export import export, export_sae, final_checkpoint

    ckpt = final_checkpoint(trainer)
    if ckpt is not None:
        if is_sharded(module):
            trainer.strategy.barrier()  # every rank has written its file of the sharded checkpoint folder
        if trainer.is_global_zero:
            export(str(ckpt), str(out), overwrite=True, strict=not hparams.transcoder)
            log.info("exported the SAE of %s to %s", ckpt, out)
        trainer.strategy.barrier()
        return
    if is_sharded(module):  # no checkpoint at the last step: every rank takes part in gathering the shards
        return export_at_fit_end(module, out)
    if not trainer.is_global_zero:
        return

    with ExitStack() as stack:
        if module.ema is not None:
            stack.enter_context(module.ema.swapped_into(module.sae))
        export_sae(module.sae, out, hook_point=hparams.hook_point, lm_name=hparams.lm_name,
                   **({"target_hook_point": hparams.target_hook_point, "strict": False}
                      if hparams.transcoder else {}))
    log.info("exported the SAE to %s", out)
