"""A progress bar with readable names: no logger version, short metric names."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar

SHORT = {"tokens_per_s": "tok/s", "val/nmse": "val_nmse", "val/best_cosine": "best_cos", "train/loss": "loss",
         "train/nmse": "nmse"}


class QuietProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar without ``v_num`` (the run is its folder, not a version) and with short names
    (``tok/s``, ``val_nmse``), so nothing is cut off on an 80-column terminal."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {SHORT.get(k, k.rsplit("/", 1)[-1]): v for k, v in items.items()}
