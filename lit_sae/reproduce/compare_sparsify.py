"""sparsify's side of the recipe comparison (``lit_sae.reproduce.compare``) and the tables of its results.

sparsify's SAE is trained by ``lit_sae/reproduce/sparsify_runner.py``, run as a file by a Python that has
eai-sparsify (its own environment, never lit-sae's), on the batches ``compare.batch_order`` fixed; the trained
folder is read back with ``lit_sae.artifacts.load.load_sae``.

Schedules (``--sparsify-args``): a preset name or the runner's own arguments.

- ``constant``: the learning rate constant from the first step (lit-sae's default schedule): the equal-LR race;
- ``decay``: sparsify's trainer's schedule, warm-up over 10% of the steps then linear decay to 0 at the last step
  (``sparsify_args`` fills the step count in);
- anything else is passed to the runner as is (e.g. ``"--warmup-steps 20"``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

RUNNER = Path(__file__).resolve().with_name("sparsify_runner.py")
#: Named ``--sparsify-args`` presets (``sparsify_args``).
PRESETS = ("constant", "decay")

__all__ = ["RUNNER", "PRESETS", "sparsify_args", "parse_lrs", "start_sparsify", "finish_sparsify", "summarize",
           "summarize_lr_sweep"]


def sparsify_args(spec: str, steps: int, lr: Optional[float] = None) -> list[str]:
    """The runner's arguments for ``spec`` (a preset of ``PRESETS`` or literal runner arguments) on a run of
    ``steps`` optimizer steps, with ``--lr lr`` added when ``lr`` is given (None: sparsify's LR law)."""
    if spec == "constant":
        args = ["--schedule", "constant"]
    elif spec == "decay":
        args = ["--schedule", "linear", "--warmup-steps", str(max(1, steps // 10))]
    else:
        args = spec.split()
    return args + (["--lr", repr(float(lr))] if lr is not None else [])


def parse_lrs(text: Optional[str]) -> list[Optional[float]]:
    """``"2e-4,4e-4"`` -> ``[2e-4, 4e-4]``; None or empty -> ``[None]`` (each side's default LR).

    Raises ValueError naming ``--lrs`` for a value that is not a positive number."""
    if not text:
        return [None]
    out = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"--lrs {text!r}: {item!r} is not a number; give e.g. --lrs 2e-4,4e-4,8e-4") from None
        if not value > 0:
            raise ValueError(f"--lrs {text!r}: {item!r} must be positive")
        out.append(value)
    return out


def start_sparsify(python: str, work: Path, out: Path, n_latents: int, k: int, seed: int, args: list[str],
                   threads: int) -> subprocess.Popen:
    """Start the runner under ``python`` (a Python with eai-sparsify) on ``work``'s ``train.npy`` / ``order.npy``;
    it saves to ``out`` and logs to ``out``.log."""
    cmd = [python, str(RUNNER), "--data", str(work), "--out", str(out), "--n-latents", str(n_latents), "--k",
           str(k), "--seed", str(seed), "--threads", str(threads), *args]
    env = dict(os.environ, SPARSIFY_DISABLE_TRITON="1")
    log.info("sparsify: %s", " ".join(cmd))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "w"))


def finish_sparsify(proc: Optional[subprocess.Popen], out: Path):
    """The trained sparsify SAE at ``out`` (loaded by lit-sae), after ``proc`` (None: trained by an earlier run).

    Raises RuntimeError naming the log when the runner failed."""
    from lit_sae.artifacts.load import load_sae

    if proc is not None and proc.wait() != 0:
        raise RuntimeError(f"the sparsify runner failed (exit {proc.returncode}); see {out.with_suffix('.log')}")
    return load_sae(out)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(rows: list[dict[str, Any]], sparsify_spec: str) -> str:
    """A markdown table, one line per (lit-sae variant, tokens, batch size, lr): the mean and seed range of the test
    NMSE ratio against sparsify run with ``sparsify_spec`` on the same seed's batches (at the same lr when the row
    has one), the worst dead fraction and the mean delta CEs. Runs trained without sparsify take its result from
    another row of the same seed, order and lr."""
    ref = {(r["seed"], r["tokens"], r["batch_size"], r.get("lr")): r for r in rows
           if "sparsify_nmse" in r and r["sparsify_args"] == sparsify_spec}
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["name"], r["tokens"], r["batch_size"], r.get("lr")), []).append(r)
    lines = ["| lit-sae variant | tokens | batch | seeds | lit NMSE | sparsify NMSE | ratio mean (range) | dead % "
             "lit / sparsify | delta CE lit / sparsify |", "|" + "---|" * 9]
    for (name, tokens, batch, lr), rs in groups.items():
        by_seed = {r["seed"]: r for r in rs}  # a rerun of a seed replaces it
        pairs = [(r, ref[(seed, tokens, batch, lr)]) for seed, r in sorted(by_seed.items())
                 if (seed, tokens, batch, lr) in ref]
        if not pairs:
            continue
        ratios = [r["lit_nmse"] / s["sparsify_nmse"] for r, s in pairs]
        dce = [(r.get("lit_delta_ce"), s.get("sparsify_delta_ce")) for r, s in pairs]
        dce_txt = (f"{_mean([a for a, _ in dce]):.4f} / {_mean([b for _, b in dce]):.4f}"
                   if all(a is not None and b is not None for a, b in dce) else "-")
        lines.append(
            f"| {name} | {tokens:,} | {batch} | {len(pairs)} | {_mean([r['lit_nmse'] for r, _ in pairs]):.4f} | "
            f"{_mean([s['sparsify_nmse'] for _, s in pairs]):.4f} | {_mean(ratios):.3f} ({min(ratios):.3f}-"
            f"{max(ratios):.3f}) | {100 * max(r['lit_dead_fraction'] for r, _ in pairs):.2f} / "
            f"{100 * max(s['sparsify_dead_fraction'] for _, s in pairs):.2f} | {dce_txt} |")
    return "\n".join(lines)


def summarize_lr_sweep(rows: list[dict[str, Any]], sparsify_spec: str) -> str:
    """The LR sweep (rows with an ``lr``, both sides trained at it with ``sparsify_spec``), per (tokens, batch): one
    line per lr with both sides' test NMSE (mean over seeds) and their ratio, then each side at its own best lr of
    the sweep and the ratio of the two bests. Empty when no row has both sides at an lr."""
    groups: dict[tuple, dict[float, list]] = {}
    for r in rows:
        if r.get("lr") is None or "sparsify_nmse" not in r or r["sparsify_args"] != sparsify_spec:
            continue
        groups.setdefault((r["tokens"], r["batch_size"]), {}).setdefault(r["lr"], []).append(r)
    out = []
    for (tokens, batch), by_lr in groups.items():
        lines = [f"{tokens:,} tokens, batch {batch}, sparsify `{sparsify_spec}`:", "",
                 "| lr (both sides) | seeds | lit-sae NMSE | sparsify NMSE | ratio |", "|---|---|---|---|---|"]
        lit, sp = {}, {}
        for lr in sorted(by_lr):
            rs = list({r["seed"]: r for r in by_lr[lr]}.values())
            lit[lr], sp[lr] = _mean([r["lit_nmse"] for r in rs]), _mean([r["sparsify_nmse"] for r in rs])
            lines.append(f"| {lr:g} | {len(rs)} | {lit[lr]:.4f} | {sp[lr]:.4f} | {lit[lr] / sp[lr]:.3f} |")
        best_lit, best_sp = min(lit, key=lit.get), min(sp, key=sp.get)
        lines.append(f"| each at its best | | {lit[best_lit]:.4f} (lr {best_lit:g}) | {sp[best_sp]:.4f} "
                     f"(lr {best_sp:g}) | {lit[best_lit] / sp[best_sp]:.3f} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)
