"""Train one recipe through ``lit-sae fit`` on 1 process and on several layouts, and compare the exported SAEs.

Every layout uses the same global batch (``data.batch_size_tokens``) and seed; lit-sae promises the same bits
(README, "Scaling out"). Prints, per layout, the max relative difference of each exported tensor from the
one-process run, and how many decoder rows differ at all.

    .venv/bin/python scripts/device_count.py --steps 100                  # quickstart on the demo shards (make demo)
    .venv/bin/python scripts/device_count.py --steps 20 --layouts ddp2 tp2 dp2tp2 --workdir runs/device-count
    .venv/bin/python scripts/device_count.py --steps 60 --model.dead_after_tokens 16384   # AuxK on from step 4

Options it does not know go to every ``lit-sae fit`` as they are.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

STRATEGY = "lit_sae.parallel.strategy.SAEModelParallelStrategy"
LAYOUTS = {
    "one": ["--trainer.devices", "1"],
    "ddp2": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
    "ddp4": ["--trainer.devices", "4", "--trainer.strategy", "ddp"],
    "tp2": ["--trainer.devices", "2", "--trainer.strategy", STRATEGY, "--trainer.strategy.data_parallel_size", "1",
            "--trainer.strategy.tensor_parallel_size", "2"],
    "tp4": ["--trainer.devices", "4", "--trainer.strategy", STRATEGY, "--trainer.strategy.data_parallel_size", "1",
            "--trainer.strategy.tensor_parallel_size", "4"],
    "dp2tp2": ["--trainer.devices", "4", "--trainer.strategy", STRATEGY, "--trainer.strategy.data_parallel_size", "2",
               "--trainer.strategy.tensor_parallel_size", "2"],
}


def fit(config: Path, work: Path, name: str, steps: int, seed: int, extra: list[str]) -> dict:
    root = work / name
    cmd = [str(Path(sys.executable).parent / "lit-sae"), "fit", "--config", str(config),
           "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--trainer.default_root_dir", str(root),
           "--trainer.accelerator", "cpu", "--seed_everything", str(seed), *LAYOUTS[name], *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name}: lit-sae fit exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return load_file(str(root / "sae" / "sae_weights.safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--layouts", nargs="+", default=["ddp2", "tp2", "dp2tp2"], choices=[k for k in LAYOUTS if k != "one"])
    p.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args, extra = p.parse_known_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lit-sae-device-count-"))
    work.mkdir(parents=True, exist_ok=True)
    ref = fit(args.config, work, "one", args.steps, args.seed, extra)
    worst = 0.0
    for name in args.layouts:
        sae = fit(args.config, work, name, args.steps, args.seed, extra)
        diffs = {k: float((sae[k].double() - v.double()).abs().max() / v.double().abs().max().clamp_min(1e-30))
                 for k, v in ref.items()}
        rows = int((sae["W_dec"] != ref["W_dec"]).any(dim=1).sum())
        worst = max(worst, *diffs.values())
        print(f"{name} vs one process after {args.steps} steps: "
              + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items()) + f"; decoder rows differing: {rows}")
    print(f"runs in {work}")
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
