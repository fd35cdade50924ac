"""Every folder a run will write is checked writable before the first step (``lit-sae fit / validate / test``).

Without it, a checkpoint folder that cannot be written is discovered when the first save fails, after the steps
it should have kept were computed; an export or report folder only at the very end. The run's root, the checkpoint
folders, the TensorBoard folder, the export folder (fit) and the report folder (test) are probed by the CLI before
``trainer.fit / validate / test`` (Lightning's own setup already creates the TensorBoard folder), and by the
``CheckOutputsWritable`` callback in ``setup`` for a ``Trainer`` built in Python.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_sae.fsync import check_writable
from lit_sae.train.runs import checkpoint_dir, export_dir, report_dir

__all__ = ["CheckOutputsWritable", "check_outputs_writable", "output_locations"]


def output_locations(trainer, pl_module, stage: str) -> list[tuple[str, Path]]:
    """``(setting, folder)`` for every folder the run writes in ``stage`` (``"fit"``, ``"validate"``, ``"test"``)."""
    root = Path(trainer.default_root_dir or ".")
    places = [("trainer.default_root_dir", root)]
    if stage == "fit":
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                folder = Path(cb.dirpath) if cb.dirpath else checkpoint_dir(root)
                places.append((f"{type(cb).__name__}.dirpath", folder))
        hp = getattr(pl_module, "hparams", {}) or {}
        if "export_dir" in hp and hp.get("export_dir") != "none":
            places.append(("model.export_dir", Path(hp["export_dir"]) if hp.get("export_dir") else export_dir(root)))
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            places.append((f"trainer.logger ({type(logger).__name__})", Path(log_dir)))
    if stage == "test":
        from lit_sae.callbacks.eval_report import EvalReport

        for cb in trainer.callbacks:
            if isinstance(cb, EvalReport):
                places.append((f"{type(cb).__name__}.out_dir", Path(cb.out_dir) if cb.out_dir else report_dir(root)))
    seen, out = set(), []
    for key, folder in places:
        if folder not in seen:
            seen.add(folder)
            out.append((key, folder))
    return out


def check_outputs_writable(trainer, pl_module, stage: str) -> None:
    """Probe every folder of :func:`output_locations`; a ValueError names the first one that cannot be written, the
    setting that names it and the fix (``lit_sae.fsync.check_writable``)."""
    for key, folder in output_locations(trainer, pl_module, stage):
        check_writable(folder, key)


class CheckOutputsWritable(Callback):
    """Probe every output folder of the run in ``setup`` (before the first step); a ValueError names the first one
    that cannot be written, the setting that names it and the fix."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        check_outputs_writable(trainer, pl_module, str(getattr(stage, "value", stage)))
