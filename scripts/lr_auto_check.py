"""Is ``model.lr: auto`` as good as the best learning rate found by hand, at equal total tokens?

For each width (``--n-latents``) and budget (``--steps``, optimizer steps of ``--batch-size`` tokens):

- by hand: ``SAESweepModule`` trains one SAE per lr of ``--hand-multipliers`` x the paper's law on one data pass
  (the quickstart's model settings, the harvest's train split in the DataModule's order); every SAE is scored at
  each budget (a constant lr: the state after S steps of a longer run is the S-step run's);
- auto: ``lit-sae fit --config configs/quickstart.yaml --model.lr auto`` (a subprocess, as a user runs it) for each
  budget, the sweep's tokens included in it;
- both scored by the same code on the held-out splits (test + val; ``lit_sae.reproduce.compare.test_metrics``).

    python scripts/lr_auto_check.py --shards runs/demo/shards --work runs/lr_auto --n-latents 4096 16384 \\
        --steps 60 120

Prints one markdown table (and appends JSON lines to ``<work>/results.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np

from lit_sae.artifacts.load import load_sae
from lit_sae.reproduce.compare import prepare_data, quickstart_model_settings, test_metrics
from lit_sae.train.lr_auto import LR_AUTO_MULTIPLIERS
from lit_sae.train.module import default_lr
from lit_sae.train.sweep import SAE_KEYS

log = logging.getLogger("lr_auto_check")
ROOT = Path(__file__).resolve().parents[1]


class ScoreAt(L.Callback):
    """Scores every SAE of a sweep on ``held_out`` after each step of ``steps``."""

    def __init__(self, steps: list[int], held_out):
        self.steps, self.held_out, self.scores = set(steps), held_out, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            for name, member in module.members.items():
                self.scores[(trainer.global_step, name)] = test_metrics(member.sae, self.held_out)["nmse"]
                member.sae.train()


def by_hand(shards: str, n_latents: int, steps: list[int], batch: int, multipliers: list[float], held_out,
            seed: int) -> dict[tuple[int, float], float]:
    """{(steps, lr): held-out NMSE} of one SAE per lr trained on one data pass."""
    from lit_sae.data.datamodule import ActivationDataModule
    from lit_sae.train.sweep import SAESweepModule

    settings = {k: v for k, v in quickstart_model_settings().items() if k in SAE_KEYS}
    settings["n_latents"] = n_latents
    lrs = [default_lr(n_latents) * m for m in multipliers]
    L.seed_everything(seed, verbose=False)
    dm = ActivationDataModule(shards, batch_size_tokens=batch, shuffle_buffer_tokens=65536, num_workers=0, seed=0)
    model = SAESweepModule(d_in=json.loads(Path(shards, "manifest.json").read_text())["d_in"],
                           saes=[{"name": f"lr{i}", "lr": lr} for i, lr in enumerate(lrs)], defaults=settings,
                           dead_after_tokens=quickstart_model_settings()["dead_after_tokens"], export_dir="none")
    score = ScoreAt(steps, held_out)
    trainer = L.Trainer(accelerator="cpu", max_steps=max(steps), max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[score])
    trainer.fit(model, datamodule=dm)
    return {(s, lrs[int(name[2:])]): v for (s, name), v in score.scores.items()}


def auto(shards: str, n_latents: int, steps: int, batch: int, work: Path, held_out, seed: int) -> dict:
    """``lit-sae fit --model.lr auto`` for ``steps`` steps; its held-out NMSE and chosen lr."""
    run = work / f"auto_n{n_latents}_s{steps}_b{batch}_seed{seed}"
    cmd = [str(Path(sys.executable).with_name("lit-sae")), "fit", "--config", str(ROOT / "configs/quickstart.yaml"),
           "--model.lr", "auto", "--model.n_latents", str(n_latents), "--data.init_args.path", shards,
           "--data.init_args.batch_size_tokens", str(batch), "--trainer.max_steps", str(steps),
           "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(run),
           "--trainer.enable_progress_bar", "false", "--seed_everything", str(seed)]
    if not (run / "sae").exists():
        log.info("%s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"lit-sae fit failed: {proc.stderr[-2000:]}")
        (run / "fit.log").write_text(proc.stderr)
    chosen = [line for line in (run / "fit.log").read_text().splitlines() if "chose lr" in line]
    return {"nmse": test_metrics(load_sae(run / "sae"), held_out)["nmse"], "chosen": chosen[-1] if chosen else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--n-latents", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--steps", type=int, nargs="+", default=[60, 120], help="budgets in optimizer steps")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--hand-multipliers", type=float, nargs="+", default=[0.5, 1, 2, 3, 4, 6, 8])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    work = Path(args.work)
    _, held_out = prepare_data(args.shards, work / "data", held_out=("test", "val"))
    held_out = np.asarray(held_out)
    lines = ["| n_latents | steps | tokens | best by hand (lr, NMSE) | lr auto: chosen lr, NMSE | auto / best |",
             "|---|---|---|---|---|---|"]
    for n in args.n_latents:
        hand = by_hand(args.shards, n, args.steps, args.batch_size, args.hand_multipliers, held_out, args.seed)
        for s in args.steps:
            row = {(lr): v for (steps, lr), v in hand.items() if steps == s}
            best = min(row, key=row.get)
            a = auto(args.shards, n, s, args.batch_size, work, held_out, args.seed)
            result = {"n_latents": n, "steps": s, "tokens": s * args.batch_size, "hand": {f"{k:.3g}": v for k, v in
                      row.items()}, "best_lr": best, "best_nmse": row[best], "auto_nmse": a["nmse"],
                      "auto_log": a["chosen"], "law": default_lr(n), "auto_grid": list(LR_AUTO_MULTIPLIERS)}
            with open(work / "results.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            lines.append(f"| {n} | {s} | {s * args.batch_size:,} | {best:.3g}, {row[best]:.4f} | {a['chosen']} "
                         f"-> {a['nmse']:.4f} | {a['nmse'] / row[best]:.3f} |")
            print(json.dumps(result), flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
