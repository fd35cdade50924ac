"""Runs ``triton_cases.py`` (lit-sae's Triton kernels against float64 references) under the Triton interpreter.

The interpreter must be chosen before ``triton`` is first imported, and this process imported it already (lightning
does): the cases run in one subprocess with ``TRITON_INTERPRET=1``, so the variable never reaches other tests. Each
case function of that file is one test here, passing when all its parametrisations passed in the subprocess.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_cases.py")
REPO = Path(__file__).resolve().parents[2]
NAMES = [f.name for f in ast.parse(CASES.read_text()).body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install 'lit-sae[test]' on Linux x86-64): Triton kernels not tested",
)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[tuple[str, str]]]:
    """{case function: [(outcome, message) per parametrisation]} from one interpreted pytest run of the cases."""
    report = tmp_path_factory.mktemp("triton_cases") / "report.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                          os.environ.get("PYTHONPATH")]))}
    env.pop("LIT_SAE_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES),
                           f"--junitxml={report}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if not report.exists():
        pytest.fail(f"the interpreted cases did not run (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    found: dict[str, list[tuple[str, str]]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
        outcome = bad[0].tag if bad else "passed"
        message = (bad[0].get("message", "") + "\n" + (bad[0].text or ""))[-2000:] if bad else ""
        found.setdefault(case.get("name").split("[")[0], []).append((outcome, message))
    return found


@pytest.mark.parametrize("name", NAMES)
def test_triton_kernel_case(outcomes, name):
    runs = outcomes.get(name)
    assert runs, f"{name} did not run in the interpreted subprocess"
    failed = [m for outcome, m in runs if outcome != "passed"]
    assert not failed, f"{name}: {len(failed)} of {len(runs)} parametrisations did not pass:\n" + "\n".join(failed)
