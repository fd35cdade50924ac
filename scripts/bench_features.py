"""Time and peak memory of `lit-sae features` on a trained SAE (default: the demo's), plus the collector's bound.

    python scripts/bench_features.py [--ckpt runs/demo/checkpoints/last.ckpt] [--out /tmp/features-bench]

Runs the real command in a child process (so the peak resident memory is that command's own, LM included) and
prints wall time, peak RSS and the collector state estimate for this SAE and for n_latents = 1M. The budget in
Target: at most 3 minutes on 2 CPU cores for the demo SAE (4,096 latents, the test split).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_features")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="runs/demo/checkpoints/last.ckpt")
    ap.add_argument("--out", default=None, help="browser folder (default: a temporary folder)")
    ap.add_argument("--extra", nargs="*", default=[], help="more `lit-sae features` arguments")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lit_sae.features.collect import memory_estimate

    out = args.out or tempfile.mkdtemp(prefix="features-bench-")
    cmd = [sys.executable, "-m", "lit_sae.cli.main", "features", "--ckpt_path", args.ckpt, "--out_dir", out, *args.extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        log.error("features failed (exit %d):\n%s", proc.returncode, proc.stderr[-3000:])
        raise SystemExit(1)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    summary = json.loads((Path(out) / "data" / "summary.json").read_text())
    n = summary["sae"]["n_latents"]
    state = sum(memory_estimate(n).values()) / 2**20
    big = memory_estimate(1 << 20)
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2**20
    log.info("lit-sae features: %d latents, %d tokens (%s split): %.1f s wall, peak RSS %.0f MB, output %.1f MB",
             n, summary["n_tokens"], summary["source"]["split"], wall, peak_mb, size)
    log.info("collector state for %d latents: %.1f MB; for n_latents = 2^20: %s", n, state,
             ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in big.items()))
    ex = summary.get("explainability") or {}
    if ex:
        log.info("N2G: mean precision %.3f, mean recall %.3f, median precision %.3f, median recall %.3f, "
                 "P and R >= 0.8: %.3f (%d scored, %d never fired)", ex["mean_precision"], ex["mean_recall"],
                 ex["median_precision"], ex["median_recall"], ex["frac_precision_recall_ge_0.8"], ex["n_scored"],
                 ex["n_never_fired"])
    log.info("browser: %s", Path(out) / "index.html")


if __name__ == "__main__":
    main()
