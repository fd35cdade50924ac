"""Moving batches from DataLoader workers to the main process: the shared-memory :class:`Ring` and the loader.

Why: a DataLoader worker normally hands each batch over in a fresh shared-memory segment, whose creation and page
faults cap transfers at about 250k activations/s (d_in 768, fp16) on a 2-core machine. The ring is used only with
worker processes (``num_workers > 0``); in-process loading hands over plain tensors. The stream works without it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from lit_sae.data.stream import ActivationStream, Dest


class Ring:
    """Preallocated shared-memory batch slots, ``slots`` per worker.

    Slots are allocated once per pass; a worker writes batch j into its slot j % slots and sends only the slot
    number; the main process copies the rows out before it asks for the next batch. The DataLoader keeps at most
    prefetch_factor * workers batches in flight, so ``slots = prefetch_factor * workers + 2`` per worker are never
    overwritten while in use.
    """

    def __init__(self, workers: int, slots: int, b: int, d: int, dtype: str):
        self.slots = slots
        self.dtype = dtype
        self.acts = torch.empty((workers, slots, b, d), dtype=torch.int16).share_memory_()
        self.ids = torch.empty((workers, slots, 3, b), dtype=torch.int64).share_memory_()

    def slot(self, worker: int, j: int) -> Dest:
        s = j % self.slots
        acts = self.acts[worker, s].numpy().view(np.uint16 if self.dtype == "bfloat16" else np.float16)
        return Dest(acts, self.ids[worker, s].numpy(), slot=(worker, s))

    def unpack(self, batch: Any, pin_memory: bool = False) -> Any:
        """Main process: replace a slot reference by a private copy of the batch (in pinned memory if asked)."""
        if not isinstance(batch, dict) or "__slot__" not in batch:
            return batch
        worker, s, n = batch.pop("__slot__").tolist()
        src_acts, src_ids = self.acts[worker, s, :n], self.ids[worker, s, :, :n]
        if pin_memory:  # copy straight into page-locked memory (the DataLoader's pinning saw only the slot number)
            acts = torch.empty(src_acts.shape, dtype=src_acts.dtype, pin_memory=True)
            ids = torch.empty(src_ids.shape, dtype=src_ids.dtype, pin_memory=True)
            acts.numpy()[:] = src_acts.numpy()
            ids.numpy()[:] = src_ids.numpy()
        else:
            # numpy copies: torch's clone() spreads a 6 MB copy over its thread pool, 10x slower on a busy 2-core box.
            acts = torch.from_numpy(src_acts.numpy().copy())
            ids = torch.from_numpy(src_ids.numpy().copy())
        acts = acts.view(torch.bfloat16 if self.dtype == "bfloat16" else torch.float16)
        batch.update(acts=acts, tok=ids[0], ctx=ids[1], pos=ids[2])
        return batch


class StreamLoader(DataLoader):
    """A DataLoader for an ActivationStream: calls ``on_iter(dataset)`` in the main process before each pass (to set
    the epoch and resume position) and, with workers, moves batches through a shared-memory ring (see Ring).

    ``state``: an object with ``state_dict()`` / ``load_state_dict(dict)`` holding the stream's position (the
    DataModule's). The loader exposes them, so Lightning sees a resumable loader (its ``_Stateful`` protocol): it saves
    the position with the fit loop and loads it back before re-creating the iterator on a restart.
    """

    def __init__(self, dataset: ActivationStream, on_iter: Optional[Callable[[ActivationStream], None]] = None,
                 state: Any = None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.on_iter = on_iter
        self.state = state

    def state_dict(self) -> dict:
        """The stream position (empty for a loader without one, e.g. validation)."""
        return self.state.state_dict() if self.state is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the stream position saved by :meth:`state_dict` (ignored without a position object)."""
        if self.state is not None and state_dict:
            self.state.load_state_dict(state_dict)

    def __iter__(self):
        if self.on_iter is not None:
            self.on_iter(self.dataset)
        ring = None
        if self.num_workers > 0 and isinstance(self.dataset, ActivationStream):
            prefetch = self.prefetch_factor or 2
            ds = self.dataset
            ring = Ring(self.num_workers, prefetch * self.num_workers + 2, ds.batch_size_tokens, ds.d_in, ds.dtype)
            ds.attach_ring(ring)
        it = super().__iter__()
        if isinstance(self.dataset, ActivationStream):
            self.dataset.attach_ring(None)  # the workers hold their copy; keep the main process's dataset plain
        # Pin only where an accelerator exists (the DataLoader itself ignores pin_memory otherwise).
        pin = self.pin_memory and torch.cuda.is_available()
        return it if ring is None else _unpacked(it, ring, pin)


def _unpacked(it, ring: Ring, pin_memory: bool):
    """Yield the loader's batches with slot references replaced by private copies (before the next one is asked)."""
    for batch in it:
        yield ring.unpack(batch, pin_memory)

