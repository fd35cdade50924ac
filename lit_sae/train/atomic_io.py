"""Crash-safe checkpoint files: write to a temporary name in the same folder, fsync, then rename over the target.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose local temporary file lives in the
system temp folder: the final move may cross file systems (a copy, not a rename) and nothing is fsynced, so a
kill or power loss during the write can leave a truncated ``last.ckpt`` that ``--ckpt_path last`` then picks up.
Here the checkpoint appears under its final name only once it is complete on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_sae import compat
from lit_sae.fsync import atomic_write
from lit_sae.safe_io import torch_load

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic: ``.{name}.XXXXXXXX.tmp`` (``lit_sae.fsync.atomic_write``) +
    fsync + ``os.replace``.

    The temporary name does not end in ``.ckpt``, so Lightning's ``ckpt_path="last"`` search never selects it.
    Remote paths (``s3://`` ...) fall back to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        """Save ``checkpoint`` to ``path``; on any failure the previous file at ``path`` is left untouched."""
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:  # an exclusive, unpredictable temporary name; fsync; rename; fsync the folder
            torch.save(checkpoint, f)
        log.debug("saved checkpoint %s", path)


    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load a local checkpoint with tensors and plain data only (``lit_sae.safe_io.torch_load``, whatever
        ``weights_only`` says: lit-sae never unpickles code); a file holding anything else is refused, naming it."""
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return torch_load(path, "checkpoint", map_location=map_location)


def _is_local(path: _PATH) -> bool:
    return type(get_filesystem(path)).__name__ == "LocalFileSystem"


def use_atomic_checkpoints(trainer) -> bool:
    """Give ``trainer`` an ``AtomicCheckpointIO`` unless it was configured with a checkpoint IO of its own.

    Returns True when the plugin was installed. Only Lightning's plain ``TorchCheckpointIO`` is replaced (a user's
    plugin, async or distributed checkpointing are kept as they are).
    """
    strategy = trainer.strategy
    current = compat.get_checkpoint_io(strategy)  # None: Lightning would create a plain TorchCheckpointIO on first use
    if current is not None and type(current) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
