"""Bad input reaches the user of ``lit-sae fit`` as one clear line (exit status 2) naming the file or key and the
fix, and leaves no checkpoint a later run would accept. Scenarios: tests/support/faults.py.

The data-level checks behind several of these have their own unit tests (tests/data/test_datamodule.py: missing/empty
folder, truncated tar, wrong shape/dtype, NaN/Inf, skip_nonfinite; tests/sae/test_sae.py: k; tests/data/test_lm.py: unknown
hook point); here they are exercised end to end through the CLI.
"""

import pytest

from tests.support import faults

pytestmark = pytest.mark.slow  # spawned processes / CLI subprocesses: over ~10 s on 2 CPU cores

IN_TEST_RESUME = {"resume_after_kill", "kill_during_checkpoint_write", "atomic_write_failure",
                  "divergence_nan_weights", "divergence_huge_lr", "incompatible_checkpoint", "changed_lr_on_resume",
                  "interrupt_sigint", "interrupt_sigterm", "interrupt_slurm_requeue"}  # (tests/callbacks/test_interrupts.py)
CASES = [s for s in faults.SCENARIOS if s.name not in IN_TEST_RESUME]


@pytest.mark.parametrize("scenario", CASES, ids=lambda s: s.name)
def test_bad_input(scenario, tmp_path):
    result = scenario.fn(tmp_path)
    assert result.ok, result.observed
