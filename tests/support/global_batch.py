"""Test helper (imported by the CLI subprocesses of test_model_parallel.py): a DataModule that splits the data wrongly.

(One process needs no helper to be fed DDP's global batches: ``data.batch_size_tokens`` is the global batch, and the
ranks' parts of a step are the one-process batch.)
"""

from torch.utils.data import DataLoader

from lit_sae.data.datamodule import ActivationDataModule


class EveryProcessItsOwnBatch(ActivationDataModule):
    """A DataModule that splits the data over all processes (global rank), ignoring a model-parallel mesh: the
    tensor-parallel ranks of one data-parallel group then read different batches (an error the strategy reports)."""

    def train_dataloader(self):
        ds = self.train_dataset(rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        return DataLoader(ds, batch_size=None)
