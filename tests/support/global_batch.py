"""Test helper (imported by the CLI subprocesses of test_ddp.py): one process fed DDP's global batches.

``GlobalBatchOfRanks`` trains one process on, at each step, the concatenation of the batches that ``ranks`` DDP
processes of ``batch_size_tokens`` each read at that step: the reference DDP must reproduce.
"""

import torch
from torch.utils.data import DataLoader

from lit_sae.data.datamodule import ActivationDataModule


class GlobalBatchOfRanks(ActivationDataModule):
    def __init__(self, *args, ranks: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranks = ranks

    def train_dataloader(self):
        streams = [self.train_dataset(rank=r, world_size=self.ranks) for r in range(self.ranks)]
        batches = [{key: torch.cat([b[key] for b in parts]) for key in parts[0]} for parts in zip(*streams)]
        return DataLoader(batches, batch_size=None)


class EveryProcessItsOwnBatch(ActivationDataModule):
    """A DataModule that splits the data over all processes (global rank), ignoring a model-parallel mesh: the
    tensor-parallel ranks of one data-parallel group then read different batches (an error the strategy reports)."""

    def train_dataloader(self):
        ds = self.train_dataset(rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        return DataLoader(ds, batch_size=None)
