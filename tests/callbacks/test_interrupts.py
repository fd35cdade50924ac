"""SIGINT, SIGTERM and SLURM's requeue signal, sent to a real ``lit-sae fit`` process (its whole process
group, DataLoader worker included), write a resumable checkpoint at the step they interrupt, exit with 128 + the
signal, and the resumed run repeats the uninterrupted run's batches and losses bit for bit. Scenarios:
tests/support/faults.py."""

import signal

import pytest

from tests.support import faults

pytestmark = pytest.mark.slow  # spawned processes / CLI subprocesses: over ~10 s on 2 CPU cores


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: signal.Signals(s).name)
def test_interrupt_saves_at_the_step_and_resumes_bit_exactly(tmp_path, signum):
    result = faults._interrupt(tmp_path, signum)
    assert result.ok, result.observed


def test_slurm_requeue_signal_saves_hpc_checkpoint_and_the_requeued_job_continues(tmp_path):
    result = faults.interrupt_slurm_requeue(tmp_path)
    assert result.ok, result.observed
