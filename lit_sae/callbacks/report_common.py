"""What the evaluation-report callbacks share (``EvalReport``, ``SweepEvalReport``): the run's manifest, config and
checkpoint as recorded in a report, the report written while incomplete, its numbers flattened for the loggers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.loggers import TensorBoardLogger

__all__ = ["checkpoint_info", "flat_numbers", "manifest_of", "report_config", "tensorboard_of", "write_partial"]


def manifest_of(trainer) -> Optional[dict]:
    """The datamodule's shard manifest as its JSON dict (None when the datamodule has none)."""
    dm = getattr(trainer, "datamodule", None)
    manifest = getattr(dm, "manifest", None)
    return manifest.to_json() if hasattr(manifest, "to_json") else manifest  # the typed Manifest as its JSON dict


def tensorboard_of(trainer):
    """The trainer's TensorBoard ``SummaryWriter``, or None when no TensorBoardLogger is attached."""
    return next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def flat_numbers(d: dict, prefix: str) -> dict[str, float]:
    """Scalar numbers of a nested dict as {"prefix/a/b": value} (lists and strings skipped)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}/{k}"
        if isinstance(v, dict):
            out.update(flat_numbers(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def write_partial(out_dir, report: dict, pending: list[str]) -> None:
    """Write the report so far, marked incomplete with the sections still to come."""
    from lit_sae.eval.report import write_report

    report["complete"], report["pending"] = False, list(pending)
    write_report(out_dir, report)


def report_config(callback, trainer, pl_module) -> dict:
    """A report's ``config`` section: the module's hyperparameters, the callback's plain settings (``eval``), the
    datamodule's arguments and, when LightningCLI saved it in the log dir (``callback._log_dir``), config.yaml."""
    cfg: dict[str, Any] = {"module": dict(getattr(pl_module, "hparams", {}) or {}),
                           "eval": {k: v for k, v in vars(callback).items() if not k.startswith("_")
                                    and isinstance(v, (int, float, str, bool, type(None)))}}
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and getattr(dm, "hparams", None):
        cfg["data"] = dict(dm.hparams)
    log_dir = getattr(callback, "_log_dir", None)
    if log_dir and (Path(log_dir) / "config.yaml").is_file():  # what LightningCLI saved for this run
        cfg["cli"] = (Path(log_dir) / "config.yaml").read_text()
    return cfg


def checkpoint_info(trainer) -> Optional[dict]:
    """The tested checkpoint (``trainer.ckpt_path``) with the sha256 of each of its files; None without one."""
    path = getattr(trainer, "ckpt_path", None)
    if not path or not Path(path).exists():
        return None
    from lit_sae.data.lm import file_sha256

    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return {"path": str(p), "sha256": file_sha256(p) if p.is_file() else None,
            "files": {str(q.relative_to(p) if p.is_dir() else q.name): file_sha256(q) for q in files}}


def log_eval_numbers(trainer, numbers: dict[str, float], title: str = "eval/numbers") -> None:
    """Log an evaluation's one-point numbers: to TensorBoard as one text card ``title`` (a two-column table; ~150
    one-point scalar cards would otherwise sort above the training curves and bury them), to every other logger
    (CSV, W&B, ...) as metrics at the current step."""
    step = trainer.global_step
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            rows = "\n".join(f"| {key} | {value:.6g} |" for key, value in sorted(numbers.items()))
            lg.experiment.add_text(title, f"| number | value |\n|---|---|\n{rows}", step)
            lg.experiment.flush()
        else:
            lg.log_metrics(numbers, step=step)
            lg.save()
