"""One folder per run: where a run keeps its checkpoints, export, report and feature browser, and which weights a
command may start from.

A run is its root folder (``trainer.default_root_dir``)::

    <root>/checkpoints/last.ckpt      resumable training state (``--ckpt_path last`` looks here)
    <root>/sae/                       the exported SAE (cfg.json + sae_weights.safetensors), written at the end of fit
    <root>/report.json, report.md     the evaluation report of ``lit-sae test`` with the evaluation callbacks
    <root>/features/                  the feature browser
    <root>/config.yaml                the fit's resolved configuration (``config_<stage>.yaml`` for other commands)
    <root>/events.out.tfevents.*      TensorBoard curves of every fit, resume and test of the run

Changing the root (or copying a recipe and changing its root) therefore isolates a run. Nothing here imports
Lightning: the CLI and the callbacks call these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

PathLike = Union[str, Path]

CHECKPOINTS = "checkpoints"
EXPORT = "sae"
FEATURES = "features"
LAST = "last.ckpt"
EVALUATING = ("validate", "test", "predict", "features")  # commands that read trained weights

__all__ = ["checkpoint_dir", "export_dir", "features_dir", "report_dir", "checkpoints_in", "resolve_ckpt_path"]


def checkpoint_dir(root: PathLike) -> Path:
    """``<root>/checkpoints``: where the run's checkpoints go unless a checkpoint callback names another folder."""
    return Path(root) / CHECKPOINTS


def export_dir(root: PathLike) -> Path:
    """``<root>/sae``: where ``fit`` exports the trained SAE unless ``model.export_dir`` says otherwise."""
    return Path(root) / EXPORT


def features_dir(root: PathLike) -> Path:
    """``<root>/features``: where the feature browser is written by default."""
    return Path(root) / FEATURES


def report_dir(root: PathLike) -> Path:
    """The run's root itself: report.json and report.md sit next to checkpoints/ and sae/."""
    return Path(root)


def checkpoints_in(folders: Iterable[PathLike]) -> list[Path]:
    """Complete checkpoint files (``*.ckpt``; temporary ``.*.tmp`` files of an interrupted write excluded)."""
    found: list[Path] = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_dir():
            found += sorted(p for p in folder.glob("*.ckpt") if _is_checkpoint(p) and not p.name.startswith("."))
    return found


def _last(folders: list[Path]) -> Optional[Path]:
    """``last.ckpt`` in the first folder that has one, else the newest checkpoint file (None if there is none)."""
    for folder in folders:
        if _is_checkpoint(folder / LAST):
            return folder / LAST
    found = checkpoints_in(folders)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or the folder a sharded strategy writes (``lit_sae.parallel.strategy``: its meta.pt)."""
    return path.is_file() or (path.is_dir() and (path / "meta.pt").is_file())


def _where(folders: list[Path]) -> str:
    return " or ".join(str(f) for f in folders) if folders else "(no checkpoint folder configured)"


def resolve_ckpt_path(
    command: str,
    ckpt_path: Optional[str],
    folders: list[PathLike],
    *,
    init_from: Optional[str] = None,
    untrained: bool = False,
    root: Optional[PathLike] = None,
) -> Optional[str]:
    """The checkpoint a command starts from, or None for the model's own weights; refuses what would go wrong silently.

    Args:
        command: ``fit``, ``validate``, ``test``, ``predict`` or ``features``.
        ckpt_path: ``None``, ``"last"``, a checkpoint file, or Lightning's ``"best"`` / ``"hpc"`` / ``"registry"``
            (passed through).
        folders: the run's checkpoint folders (``<root>/checkpoints`` or the checkpoint callbacks' ``dirpath``).
        init_from: ``model.init_from`` (an exported SAE the model starts from).
        untrained: evaluate the model's initial weights on purpose (validate / test / features only).
        root: the run's root; a fit without ``ckpt_path`` continues from the ``hpc_ckpt_*.ckpt`` a cluster
            preemption left there (Lightning's SLURM auto-requeue), as Lightning itself would.

    Returns:
        The path to pass to Lightning's ``ckpt_path`` (``"last"`` replaced by the file it names), or None.

    Raises:
        FileNotFoundError: ``last`` with no checkpoint in ``folders`` (for fit too: a fresh start is what omitting
            ``--ckpt_path`` means), or a checkpoint file that does not exist.
        ValueError: a fresh fit (no ``ckpt_path``) into folders that already hold a checkpoint (it would put its
            checkpoints beside another run's); an evaluation with neither a checkpoint, ``init_from`` nor
            ``untrained``; ``untrained`` with ``fit``.
    """
    dirs = [Path(f) for f in folders]
    if untrained and command not in EVALUATING:
        raise ValueError(f"--untrained is for {', '.join(EVALUATING)}; `{command}` trains: remove --untrained")
    if ckpt_path == "last":
        last = _last(dirs)
        if last is None:
            hint = ("start a fresh fit by omitting --ckpt_path" if command == "fit" else
                    "train first (`lit-sae fit --config ...`), or point --trainer.default_root_dir at the run")
            raise FileNotFoundError(f"--ckpt_path last: no checkpoint in {_where(dirs)}; {hint}")
        return str(last)
    if ckpt_path in ("best", "hpc", "registry") or (ckpt_path and "://" in ckpt_path):
        return ckpt_path  # Lightning resolves these itself
    if ckpt_path is not None:
        if not _is_checkpoint(Path(ckpt_path)):
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file (use `last` for the run's "
                                    f"latest checkpoint in {_where(dirs)})")
        return ckpt_path
    if command == "fit":
        if root is not None and any(Path(root).glob("hpc_ckpt_*.ckpt")):
            return "hpc"  # a requeued job runs the same command line again: continue it
        existing = checkpoints_in(dirs)
        if existing:
            raise ValueError(
                f"{existing[0]} already exists: this run folder belongs to an earlier fit. Resume it with "
                "--ckpt_path last, or start a new run in another folder with --trainer.default_root_dir NEW_FOLDER"
            )
        return None
    if init_from is None and not untrained:
        found = _last(dirs)
        hint = f"--ckpt_path last (found {found})" if found else f"--ckpt_path last (none yet in {_where(dirs)})"
        raise ValueError(
            f"`{command}` has no trained weights to evaluate: pass {hint} or a checkpoint file, "
            "--model.init_from an exported SAE folder, or --untrained true to evaluate the initial weights on purpose"
        )
    return None
