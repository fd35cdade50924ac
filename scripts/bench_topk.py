"""Time of the exact top-k selection over one pre-activation chunk: ``torch.topk`` against ``selection.topk_exact``
with and without its group-maximum pre-filter, at the chunk shapes of ``scripts/benchmark.py``'s regimes.

    .venv/bin/python scripts/bench_topk.py                 # the default shapes, group sizes 4-32
    .venv/bin/python scripts/bench_topk.py --shape 4096:16384:32 --groups 8 16

Prints milliseconds (the median of --repeats calls after one warm-up) and each time as a ratio to ``torch.topk`` of
K + 1 in the same run; checks that every variant returns the same indices as the unfiltered selection.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts.benchmark, when run as a script

from lit_sae.sae import selection  # noqa: E402
from scripts.benchmark import _time  # noqa: E402

# (rows, columns, K) of one chunk as the encoder selects from it: steady n 16384 (k 32), Multi-TopK's 4k = 128 (and
# k 128), n 65536 and 262144 at the CPU chunk budget of 256 MiB, and AuxK's dead half (k_aux 384 of 8192 columns).
SHAPES = ("4096:16384:32", "4096:16384:128", "1024:65536:32", "256:262144:32", "4096:8192:384")


def _median_ms(fn, repeats: int) -> float:
    return statistics.median(_time(fn, "cpu", repeats)) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs="+", default=list(SHAPES), help="ROWS:COLUMNS:K")
    p.add_argument("--groups", nargs="+", type=int, default=[4, 8, 16, 32], help="pre-filter group sizes to time")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, pre-activations ~ N(0, 1)")
    print("| rows | columns | K | torch.topk ms | unfiltered ms | auto (group) ms | " +
          " | ".join(f"group {g} ms" for g in args.groups) + " |")
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(args.groups))
    for spec in args.shape:
        R, m, K = (int(v) for v in spec.split(":"))
        pre = torch.randn(R, m)
        ref = selection._topk_exact(pre, K)
        base = _median_ms(lambda: pre.topk(K + 1, dim=1), args.repeats)
        cells = [f"{base:.1f}"]
        plain = _median_ms(lambda: selection._topk_exact(pre, K), args.repeats)
        cells.append(f"{plain:.1f} ({plain / base:.2f})")
        auto_g = selection.prefilter_group_size(m, K, pre)
        assert torch.equal(selection.topk_exact(pre, K)[1], ref[1]), f"{spec}: auto differs"
        auto = _median_ms(lambda: selection.topk_exact(pre, K), args.repeats)
        cells.append(f"{auto:.1f} ({auto / base:.2f}, g {auto_g or '-'})")
        for g in args.groups:
            if m // g < K + 1:
                cells.append("-")
                continue
            assert torch.equal(selection.topk_prefiltered(pre, K, g)[1], ref[1]), f"{spec} group {g}: differs"
            ms = _median_ms(lambda: selection.topk_prefiltered(pre, K, g), args.repeats)
            cells.append(f"{ms:.1f} ({ms / base:.2f})")
        print(f"| {R} | {m} | {K} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
