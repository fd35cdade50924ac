"""MSE-only vs MSE + an end-to-end KL phase at equal total tokens, on the embedded default (issue #30).

For each seed:
  A  ``lit-sae fit --config configs/quickstart.yaml`` for N steps of 4,096 activation tokens (MSE-only);
  B  the same for 0.9 N steps, then ``lit-sae fit --config configs/finetune-kl.yaml`` from its export for the
     remaining 0.1 N x 4,096 tokens, counted as replaceable token positions (2,016 per step: 32 contexts x 63);
then each export is evaluated by ``lit-sae test --config configs/quickstart.yaml --config <eval.yaml>
--model.init_from <export>``: lit-sae's own report on the test split (NMSE on the test shards; delta CE and KL with
the reconstruction spliced in, on the first --test_contexts test contexts). The table is printed and written to <out>/table.md.

    python scripts/kl_finetune_compare.py --out runs/kl-compare            # harvests configs/harvest/smollm2-demo
    python scripts/kl_finetune_compare.py --out runs/kl-compare --shards runs/demo/shards

A stage whose output exists is not run again (a rerun after an interruption continues).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MSE_BATCH = 4096  # configs/quickstart.yaml's data.batch_size_tokens
KL_BATCH = 2016  # configs/finetune-kl.yaml's: 32 contexts x 63 replaceable positions

EVAL_YAML = """trainer:
  callbacks+:
    - class_path: lit_sae.callbacks.eval_report.EvalReport
      init_args:
        downstream: true
        n_contexts: {n_contexts}
        probes: false
        ablation: false
        explain: false
        batch_size: 8
        progress: false
"""


def lit_sae(*args: str) -> float:
    """Run ``lit-sae args`` (the console script next to this Python); its wall time in seconds."""
    exe = Path(sys.executable).with_name("lit-sae")
    t0 = time.perf_counter()
    cmd = [str(exe) if exe.exists() else "lit-sae", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def fit_mse(out: Path, shards: Path, seed: int, steps: int) -> float:
    if (out / "sae" / "cfg.json").is_file():
        return math.nan
    shutil.rmtree(out, ignore_errors=True)
    return lit_sae("fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(out),
                   "--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", "--seed_everything", str(seed),
                   "--data.init_args.path", str(shards), "--data.init_args.seed", str(seed))


def fit_kl(out: Path, start: Path, shards: Path, seed: int, steps: int, extra: list[str]) -> float:
    if (out / "sae" / "cfg.json").is_file():
        return math.nan
    shutil.rmtree(out, ignore_errors=True)
    return lit_sae("fit", "--config", "configs/finetune-kl.yaml", "--trainer.default_root_dir", str(out),
                   "--trainer.max_steps", str(steps), "--seed_everything", str(seed),
                   "--model.init_from", str(start / "sae"), "--data.init_args.manifest", str(shards),
                   "--data.init_args.seed", str(seed), *extra)


def evaluate(run: Path, shards: Path, eval_yaml: Path) -> dict:
    out = run / "eval"
    report = out / "report.json"
    if not report.is_file():
        shutil.rmtree(out, ignore_errors=True)
        lit_sae("test", "--config", "configs/quickstart.yaml", "--config", str(eval_yaml),
                "--model.init_from", str(run / "sae"), "--trainer.default_root_dir", str(out),
                "--data.init_args.path", str(shards))
    r = json.loads(report.read_text())
    d = r["downstream"]
    return {"nmse": r["metrics"]["nmse"], "delta_ce": d["delta_ce"], "kl": d["kl_sae"], "clean_ce": d["clean_ce"],
            "l0": r["metrics"]["l0"], "n_tokens": d["n_tokens"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/kl-compare")
    p.add_argument("--shards", default=None, help="a harvest of the embedded default (default: harvest one in out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=130, help="N: the MSE-only run's steps of 4,096 tokens")
    p.add_argument("--kl_fraction", type=float, default=0.1)
    p.add_argument("--test_contexts", type=int, default=64, help="test contexts for delta CE (the eval's default)")
    p.add_argument("--before_kl", action="store_true", help="also evaluate B's MSE part before its KL phase")
    p.add_argument("--kl_args", default="", help='overrides for the KL phase, e.g. "--model.kl_mse_coef 4"')
    p.add_argument("--kl_name", default="kl", help="the KL phase's run folder in each seed's folder")
    a = p.parse_args()
    out = (ROOT / a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards = Path(a.shards).resolve() if a.shards else out / "shards"
    if not (shards / "manifest.json").is_file():
        lit_sae("harvest", "--config", "configs/harvest/smollm2-demo.yaml", "--out_dir", str(shards))
    eval_yaml = out / "eval.yaml"
    eval_yaml.write_text(EVAL_YAML.format(n_contexts=a.test_contexts))
    n_tokens = a.steps * MSE_BATCH
    mse_steps = round(a.steps * (1 - a.kl_fraction))
    kl_steps = round((n_tokens - mse_steps * MSE_BATCH) / KL_BATCH)
    rows, times = [], {}
    for seed in a.seeds:
        base = out / f"seed{seed}"
        times[("A", seed)] = fit_mse(base / "mse", shards, seed, a.steps)
        times[("B-mse", seed)] = fit_mse(base / "mse90", shards, seed, mse_steps)
        times[("B-kl", seed)] = fit_kl(base / a.kl_name, base / "mse90", shards, seed, kl_steps, shlex.split(a.kl_args))
        runs = [("MSE only", base / "mse", n_tokens),
                ("MSE 90% + KL 10%", base / a.kl_name, mse_steps * MSE_BATCH + kl_steps * KL_BATCH)]
        if a.before_kl:
            runs.append(("(MSE 90%, before KL)", base / "mse90", mse_steps * MSE_BATCH))
        for name, run, tokens in runs:
            rows.append({"seed": seed, "recipe": name, "tokens": tokens, **evaluate(run, shards, eval_yaml)})
    lines = [f"KL phase: configs/finetune-kl.yaml {a.kl_args}".rstrip(),
             f"MSE-only N = {a.steps} x {MSE_BATCH} = {n_tokens:,} tokens; B: {mse_steps} MSE steps + {kl_steps} KL "
             f"steps of {KL_BATCH}; test: {rows[0]['n_tokens']:,} scored tokens, clean CE {rows[0]['clean_ce']:.4f}",
             "", "| seed | recipe | tokens | test NMSE | delta CE (nats) | KL (nats) | L0 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['recipe']} | {r['tokens']:,} | {r['nmse']:.4f} | {r['delta_ce']:.4f} | "
              f"{r['kl']:.4f} | {r['l0']:.1f} |" for r in rows]
    lines += ["", "| recipe | mean test NMSE | mean delta CE | mean KL |", "|---|---|---|---|"]
    means = {}
    for name in dict.fromkeys(r["recipe"] for r in rows):
        sel = [r for r in rows if r["recipe"] == name]
        means[name] = {k: statistics.mean(r[k] for r in sel) for k in ("nmse", "delta_ce", "kl")}
        lines.append(f"| {name} | {means[name]['nmse']:.4f} | {means[name]['delta_ce']:.4f} | {means[name]['kl']:.4f} |")
    a_, b_ = means["MSE only"], means["MSE 90% + KL 10%"]
    lines += ["", f"delta CE ratio (KL / MSE-only): {b_['delta_ce'] / a_['delta_ce']:.3f} (target <= 0.7); "
              f"NMSE ratio: {b_['nmse'] / a_['nmse']:.3f} (target <= 1.10)",
              "wall s: " + ", ".join(f"{k[0]} seed {k[1]}: {v:.0f}" for k, v in times.items() if not math.isnan(v))]
    text = "\n".join(lines)
    print(text)
    (out / f"table-{a.kl_name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
