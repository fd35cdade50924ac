"""Interrupts keep the work: SIGINT, SIGTERM and a cluster's requeue signal end a fit with a resumable checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_sae import compat
from lit_sae.callbacks.checkpoint import Checkpoint

log = logging.getLogger(__name__)


class Interrupted(SystemExit):
    """Raised after the checkpoint of an interrupted fit is written; exit status 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + int(signum))
        self.signum = int(signum)


class SaveOnInterrupt(L.Callback):
    """On SIGINT (Ctrl-C), SIGTERM or the cluster's requeue signal, finish the current optimizer step, write
    ``last.ckpt`` atomically with the whole training state, and stop with exit status 128 + signal.

    The signal only sets a flag; the save happens at the end of the step (``on_train_batch_end``, where the periodic
    saves happen too), so the checkpoint is at a step boundary and a ``--ckpt_path last`` resume continues
    bit-exactly. A second Ctrl-C stops at once (Python's KeyboardInterrupt) without saving. Under DDP the ranks
    agree on stopping (one boolean all-reduce per step) so all of them save and stop at the same step. DataLoader
    workers start with these signals blocked: the training process decides, and stops them itself.

    The handlers are installed in ``setup``, before Lightning's: Lightning then leaves the requeue signal of
    ``SLURMEnvironment(auto_requeue=True)`` (``requeue_signal``, SIGUSR1 by default) to this callback, and SIGTERM
    is taken back from Lightning's notifier at ``on_train_start`` (see there). At the step boundary this callback
    then runs Lightning's own SLURM routine, which writes ``hpc_ckpt_N.ckpt`` into the run's root and requeues the
    job; the requeued job runs the same command line and continues from it (``lit_sae.train.runs.resolve_ckpt_path``).
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._fallback: dict[int, Any] = {}  # what a signal does once this callback is done with it
        self._pid = os.getpid()

    # ------------------------------------------------------------------ signal handlers (main thread only)
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if str(getattr(stage, "value", stage)) != "fit" or threading.current_thread() is not threading.main_thread():
            return
        self.received, self._pid = None, os.getpid()
        _children_block_stop_signals(True)
        for signum in self._signals(trainer):
            current = signal.getsignal(signum)
            if current != self._on_signal:  # a second setup without teardown keeps the first one's originals
                self._previous[signum] = current
            signal.signal(signum, self._on_signal)
        self._fallback = dict(self._previous)

    @staticmethod
    def _signals(trainer: L.Trainer) -> list[int]:
        env = compat.cluster_environment(trainer)
        signals = [signal.SIGINT, signal.SIGTERM]
        if requeue_signal(env) is not None:
            signals.append(requeue_signal(env))
        return signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker inherited this handler: the training process decides, workers go on
        if signum not in self._previous:  # the fit is over: act as the handler this one replaced
            _act_as(self._fallback.get(signum, signal.SIG_DFL), signum, frame)
            return
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        if self.received is None:
            self.received = signum
            log.warning("received %s: stopping after this step with a checkpoint (Ctrl-C again to stop at once)",
                        signal.Signals(signum).name)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning has chained its own SIGTERM notifier in front of this handler by now; take SIGTERM back, so that
        Lightning does not stop the loop itself (``SIGTERMException``, exit 0) between this callback's check and
        the next step, which would lose the steps since the last periodic checkpoint."""
        if signal.SIGTERM in self._previous and os.getpid() == self._pid:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _restore(self) -> None:
        _children_block_stop_signals(False)
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning restores the handlers it saved at the start of the fit (these) after this hook: have it restore
        # the ones from before this callback instead
        compat.lightning_restores_signals_to(trainer, {s: h for s, h in self._previous.items() if h is not None})
        self._restore()

    # ------------------------------------------------------------------ the save, at a step boundary
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.received if self.received is not None else signal.SIGTERM
        path = self._save(trainer)
        log.warning("interrupted by %s at step %d: saved %s; continue with `lit-sae fit ... --ckpt_path last`",
                    signal.Signals(signum).name, trainer.global_step, path)
        if signum == requeue_signal(compat.cluster_environment(trainer)):
            compat.slurm_save_and_requeue(trainer, signum)  # Lightning's hpc checkpoint at this step + requeue
        raise Interrupted(signum)

    @staticmethod
    def _save(trainer: L.Trainer) -> str:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, Checkpoint) and cb.save_last:
                return cb.save_last_now(trainer)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                compat.save_last_checkpoint(cb, trainer)
                return cb.last_model_path
        from lit_sae.train.runs import LAST, checkpoint_dir

        path = str(checkpoint_dir(trainer.default_root_dir) / LAST)
        trainer.save_checkpoint(path)
        return path


def _act_as(handler: Any, signum: int, frame: Any) -> None:
    """Do what ``handler`` (a callable, ``SIG_DFL`` or ``SIG_IGN``, as ``signal.getsignal`` returns it) would do."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_IGN:
        return
    elif signum == signal.SIGINT:
        raise KeyboardInterrupt
    else:  # the default action (SIGTERM: the process ends)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_BLOCK_IN_CHILDREN = [False]


def _children_block_stop_signals(on: bool) -> None:
    """While a fit runs, processes forked from it (DataLoader workers) start with SIGINT and SIGTERM blocked.

    A terminal's Ctrl-C and a scheduler's SIGTERM reach the whole process group; torch's workers die of SIGTERM
    (their C handler re-raises it), and the training process would then fail mid-step with "DataLoader worker ...
    killed by signal" instead of saving at the end of the step. The signal mask survives torch's own handler
    setup in the worker; the training process shuts its workers down itself when it stops, and its own SIGTERM
    (``Process.terminate()``) still ends them (:func:`_exit_on_parents_sigterm`)."""
    _BLOCK_IN_CHILDREN[0] = on


def _block_stop_signals_if_asked() -> None:
    if _BLOCK_IN_CHILDREN[0]:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        threading.Thread(target=_exit_on_parents_sigterm, args=(os.getppid(),), name="lit-sae-sigterm",
                         daemon=True).start()


def _exit_on_parents_sigterm(parent: int) -> None:
    """In a child forked during a fit (its SIGTERM blocked): take each SIGTERM as it comes; one sent by the parent
    (``Process.terminate()``: the DataLoader shutting its workers down, multiprocessing's exit routine) ends the
    child as torch's worker handler does, one from anyone else (a scheduler signalling the process group) is
    dropped, since the training process stops its workers itself. Without this a worker outliving its fit (an
    iterator not yet collected) could not be terminated, and the interpreter's exit would wait for it forever."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_block_stop_signals_if_asked)


def requeue_signal(env: Any) -> Optional[int]:
    """The requeue signal of a ``SLURMEnvironment`` with ``auto_requeue`` (None for any other environment)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
        return int(env.requeue_signal)
    return None

