"""Markers applied by test name (declared in pyproject.toml): ``slow`` for tests that take over ~10 s on 2 CPU cores
(spawned processes, real LM runs, CLI subprocesses) and ``gpu`` for cases parametrised on a CUDA device.
``pytest -m "not slow"`` runs the quick part; the ``gpu`` cases exist only where CUDA does (scripts/gpu_check.sh)."""

import pytest

SLOW = (  # node-id prefixes, measured with `pytest --durations`
    "test_cli_console.py::", "test_ddp.py::", "test_ddp_eval.py::", "test_faults.py::", "test_interrupts.py::",
    "test_resume.py::", "test_sweep.py::", "test_tensor_parallel.py::", "test_reproduce.py::", "test_model_parallel.py::",
    "test_datamodule.py::test_real_ddp_two_ranks_two_workers", "test_harvest.py::test_sigkill_then_resume",
    "test_metrics.py::test_ddp_two_ranks_equal_single", "test_module.py::test_auxk_revives_dead_latents",
    "test_module.py::test_short_fit_recovers_known_features", "test_plan.py::test_real_ddp_test_matches_one_process",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.nodeid.rsplit("/", 1)[-1]
        if name.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(str(v).startswith("cuda") for v in params.values()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def harvested(tmp_path_factory):
    """One tiny-LM harvest (``_tiny_lm.harvest_tiny``) shared, read-only, by the evaluation-report tests."""
    from _tiny_lm import harvest_tiny

    return harvest_tiny(tmp_path_factory.mktemp("tiny_harvest"))
