"""A fit in a long-lived process (a notebook, a test runner) gives SIGINT and SIGTERM back as it found them, whether
it finished, failed or was interrupted: the handlers Lightning saves at the start of a fit are this callback's own,
and Lightning puts them back after the callbacks' ``on_exception`` (``compat.lightning_restores_signals_to``)."""

import os
import signal

import lightning as L
import pytest

from lit_sae.callbacks.interrupt import Interrupted, SaveOnInterrupt
from lit_sae.data.synthetic import SyntheticDataModule
from lit_sae.train.module import SAEModule


class Boom(L.Callback):
    def __init__(self, exc):
        self.exc = exc

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            raise self.exc


class Send(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit(tmp_path, *callbacks):
    L.seed_everything(0)
    dm = SyntheticDataModule(d_in=8, n_features=16, active=2, batch_size_tokens=64, train_tokens=64 * 16)
    trainer = L.Trainer(max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=list(callbacks))
    trainer.fit(SAEModule(d_in=8, n_latents=16, k=2, export_dir="none", init_tokens=64), dm)


@pytest.fixture
def own_handlers():
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, mine)
    try:
        yield mine, seen
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@pytest.mark.parametrize("how", ["finished", "failed", "interrupted"])
def test_a_fit_gives_the_signal_handlers_back(tmp_path, own_handlers, how):
    mine, seen = own_handlers
    sigint = signal.getsignal(signal.SIGINT)
    cb = SaveOnInterrupt()
    if how == "finished":
        _fit(tmp_path, cb)
    elif how == "failed":
        with pytest.raises(RuntimeError, match="boom"):
            _fit(tmp_path, cb, Boom(RuntimeError("boom")))
    else:
        with pytest.raises(Interrupted) as exc:
            _fit(tmp_path, cb, Send())
        assert exc.value.code == 128 + signal.SIGTERM and seen == []  # the callback, not `mine`, took it
    assert signal.getsignal(signal.SIGTERM) is mine
    assert signal.getsignal(signal.SIGINT) is sigint
    os.kill(os.getpid(), signal.SIGTERM)  # reaches the handler from before the fit
    assert seen == [signal.SIGTERM]


def test_a_stale_handler_acts_as_the_one_it_replaced(tmp_path, own_handlers):
    """Should anything reinstall the callback's handler after the fit, it passes the signal on rather than
    swallowing it."""
    mine, seen = own_handlers
    cb = SaveOnInterrupt()
    _fit(tmp_path, cb)
    signal.signal(signal.SIGTERM, cb._on_signal)
    os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [signal.SIGTERM] and cb.received is None


def test_a_child_forked_during_a_fit_ends_on_its_parents_sigterm_only():
    """A DataLoader worker forked during a fit starts with SIGINT/SIGTERM blocked (a scheduler's SIGTERM to the
    process group must not kill it mid-step), yet ``Process.terminate()`` from the training process still ends it:
    otherwise a worker outliving its fit (an iterator kept by a failed fit's traceback) stops the interpreter's exit,
    where multiprocessing terminates and joins every child."""
    import multiprocessing
    import subprocess
    import time

    from lit_sae.callbacks.interrupt import _children_block_stop_signals

    _children_block_stop_signals(True)
    try:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,), daemon=True)
        child.start()
    finally:
        _children_block_stop_signals(False)
    try:
        deadline = time.time() + 60  # the child blocks the signals in its at-fork hook: wait until it has
        while not _blocked(child.pid, signal.SIGTERM) and time.time() < deadline:
            time.sleep(0.01)
        subprocess.run(["kill", "-TERM", str(child.pid)], check=True)  # from another process: dropped
        child.join(timeout=2)
        assert child.is_alive()
        child.terminate()  # from the parent: ends it
        child.join(timeout=30)
        assert child.exitcode == 0
    finally:
        child.kill()
        child.join()


def _blocked(pid: int, signum: int) -> bool:
    """Whether ``signum`` is in the signal mask of ``pid``'s main thread (``SigBlk`` of /proc/PID/status)."""
    from pathlib import Path

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False
