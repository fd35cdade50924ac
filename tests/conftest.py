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



# ---- the suite leaves nothing behind ---------------------------------------------------------------------------------
# Every process the suite starts carries this marker in its environment (inherited by subprocesses, DDP ranks,
# DataLoader workers), so one that outlives its test can be found even after it was re-parented.
_MARK = "LIT_SAE_TEST_SESSION"


def pytest_configure(config):
    import os
    import uuid

    os.environ[_MARK] = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # a suite run by a test gets its own
    config._lit_sae_tree = _tree_status(config.rootpath)


def _tree_status(root) -> set:
    """``git status`` lines of the checkout (files changed or added outside .gitignore); empty outside a git
    checkout."""
    import subprocess

    if not (root / ".git").exists():
        return set()
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True,
                         text=True)
    return set(out.stdout.splitlines()) if out.returncode == 0 else set()


# multiprocessing's helper processes of this interpreter: they end when it does (they read a pipe from it)
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _marked_processes() -> list[tuple[int, str]]:
    """(pid, command line) of live processes other than this one that carry this session's marker."""
    import os
    from pathlib import Path

    mark = f"{_MARK}={os.environ.get(_MARK, '')}".encode()
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        pid = int(d.name)
        if pid == os.getpid():
            continue
        try:
            if mark not in (d / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if any(helper in cmd for helper in _HELPERS):
            continue
        found.append((pid, cmd[:200]))
    return found


def pytest_sessionfinish(session, exitstatus):
    """What would keep the runner waiting after the last test is reported and cleaned up: a child process that
    ``terminate()`` does not end (multiprocessing's exit routine terminates and joins every child), a process started
    by the suite still alive (it holds the runner's output pipe open), a non-daemon thread (the interpreter waits for
    it), SIGINT/SIGTERM handlers a test left installed (the runner's SIGTERM would be swallowed), or files written
    into the checkout. A leak fails the
    session, naming what leaked; leaked processes are killed so the runner is not kept waiting."""
    import multiprocessing
    import os
    import signal
    import threading

    problems = []
    for child in multiprocessing.active_children():  # the interpreter's exit terminates and joins each of these
        child.terminate()
        child.join(timeout=10)
        if child.is_alive():
            problems.append(f"child process {child.pid} ({child.name}) does not end on terminate(): the "
                            "interpreter's exit would wait for it forever")
            child.kill()
            child.join(timeout=10)
    for pid, cmd in _marked_processes():
        problems.append(f"process {pid} still running: {cmd}")
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    wrote = sorted(_tree_status(session.config.rootpath) - getattr(session.config, "_lit_sae_tree", set()))
    if wrote:
        problems.append(f"the suite wrote into the checkout (write under tmp_path instead): {wrote[:5]}")
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if threads:
        problems.append(f"non-daemon threads still running: {threads}")
    for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(signum) is not default:
            problems.append(f"{signal.Signals(signum).name} handler left installed: {signal.getsignal(signum)!r}")
    if problems:
        session.config._lit_sae_leaks = problems
        if session.exitstatus == 0:
            session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in getattr(config, "_lit_sae_leaks", []):
        terminalreporter.write_line(f"LEAK: {line}", red=True)


def pytest_unconfigure(config):
    """Should the interpreter still not have exited two minutes after the suite ended (a hang in its shutdown), print
    every thread's stack and exit 1, rather than keep the runner waiting for its time limit."""
    import faulthandler

    faulthandler.dump_traceback_later(120, exit=True)
