"""Start time of the ``lit-sae`` command: ``--help`` and a fit that fails on a mistyped key.

    .venv/bin/python scripts/start_time.py [--repeat 3]

Each command runs as a fresh process (the console script of this venv); the table gives the median wall time, the
exit status and the first line of the error, against the 2 s target, and the load average when it ran. Quote the
numbers as measured on one machine at one time, next to the ``import torch`` reference of the same run: on a loaded
machine every import is slower. A bad key or value is caught by ``lit_sae.cli.check`` before torch and Lightning load;
``fit --help`` still builds LightningCLI's parser.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LIT_SAE = str(Path(sys.executable).with_name("lit-sae"))
ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 2.0
COMMANDS = {
    "lit-sae --help": [LIT_SAE, "--help"],
    "lit-sae export --help": [LIT_SAE, "export", "--help"],
    "lit-sae fit --model.n_latnets 8 (bad key)": [LIT_SAE, "fit", "--config", str(ROOT / "configs" / "synthetic.yaml"),
                                                   "--model.n_latnets", "8"],
    "lit-sae fit quickstart --model.bogus 1 (bad key)": [LIT_SAE, "fit", "--config",
                                                         str(ROOT / "configs" / "quickstart.yaml"), "--model.bogus", "1"],
    "lit-sae fit quickstart --model.k abc (bad value)": [LIT_SAE, "fit", "--config",
                                                         str(ROOT / "configs" / "quickstart.yaml"), "--model.k", "abc"],
    "lit-sae fit --help": [LIT_SAE, "fit", "--help"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
}


def measure(cmd: list[str], repeat: int) -> tuple[float, int, str]:
    times, code, line = [], 0, ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        code = p.returncode
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        line = (errors or [""])[0][:90]
    return statistics.median(times), code, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (the median is reported)")
    args = parser.parse_args()
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"| command | median s ({args.repeat} runs) | target | exit | error line |")
    print("|---|---|---|---|---|")
    for name, cmd in COMMANDS.items():
        seconds, code, line = measure(cmd, args.repeat)
        target = "" if "reference" in name else ("ok" if seconds < TARGET_S else f"> {TARGET_S:.0f} s")
        print(f"| {name} | {seconds:.2f} | {target} | {code} | {line} |", flush=True)


if __name__ == "__main__":
    main()
