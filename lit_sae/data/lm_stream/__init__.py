"""Activations streamed from the language model during training (no harvest): :class:`LMStreamDataModule`.

One file per job: ``rows.py`` (text -> contexts -> LM forward -> filters), ``mixing.py`` (the mixing buffer and the
resume position), ``dataset.py`` (one rank's batches and their loader), ``datamodule.py`` (the DataModule).
"""

from lit_sae.data.lm_stream.datamodule import LMStreamDataModule, harvest_config

__all__ = ["LMStreamDataModule", "harvest_config"]
