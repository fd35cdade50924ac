"""Shared fixtures. ``slow`` is set where a test is written (``@pytest.mark.slow`` or a module's ``pytestmark``);
the ``gpu`` marker is added here to cases parametrised on a CUDA device (they exist only where CUDA does;
scripts/gpu_check.sh runs them). ``make test-fast`` runs ``pytest -m "not slow"``."""

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(str(v).startswith("cuda") for v in params.values()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def harvested(tmp_path_factory):
    """One tiny-LM harvest (``tests.support.tiny_lm.harvest_tiny``) shared, read-only, by the evaluation-report tests."""
    from tests.support.tiny_lm import harvest_tiny

    return harvest_tiny(tmp_path_factory.mktemp("tiny_harvest"))
