"""Compare lit-sae's training recipe with EleutherAI sparsify's on the same activations, batch for batch.

Both sides train a TopK SAE (n_latents, k) on the same train-split tokens of a harvest, in the same batches and the
same order (``order.npy``), for the same number of tokens; both are scored here by the same code on the harvest's
held-out test split:

- test NMSE: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the whole test split (the mean is the test split's);
- L0: mean active latents per token; dead: the fraction of latents that never fire on the test split;
- delta CE (``--delta-ce-contexts N``): the LM's next-token loss with the SAE spliced in minus the clean loss, on the
  first N test-split contexts (``lit_sae.eval.downstream``).

lit-sae's side is ``SAEModule`` under a Lightning ``Trainer`` (the training step of ``lit-sae fit``) with the model
settings of ``configs/quickstart.yaml``, changed by ``--lit KEY=VALUE``. sparsify's side runs
``scripts/sparsify_runner.py`` in sparsify's own environment (``--sparsify-python``), with sparsify's Adam recipe.
Two lever settings are not SAEModule arguments and are applied by this script before the fit: ``b_pre_init=mean``
(instead of the geometric median) and ``encoder_scale=data`` (rescale W_enc so that the initial reconstruction has
the least-squares optimal scale).

    python scripts/compare_recipes.py --shards runs/big/shards --work /scratch/cmp --tokens 800000 --seeds 0 1 \\
        --sparsify-python ../sparsify-venv/bin/python --lit lr=8e-4 --delta-ce-contexts 16
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger("compare_recipes")
HERE = Path(__file__).resolve().parent
EXTRA_LEVERS = ("b_pre_init", "encoder_scale")  # applied by this script, not SAEModule arguments


# ------------------------------------------------------------------ data
def prepare_data(
    shards: str,
    work: Path,
    max_train_tokens: Optional[int] = None,
    max_test_tokens: Optional[int] = None,
    held_out: tuple[str, ...] = ("test",),
) -> tuple[np.ndarray, np.ndarray]:
    """The harvest's train split and its held-out splits ``held_out`` (concatenated) as (N, d_in) float16 arrays
    ``work/train.npy`` and ``work/test.npy`` (manifest order), written once (temp file, then rename) and
    memory-mapped afterwards."""
    from lit_sae.data.datamodule import ActivationDataModule

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, splits, cap in (("train", ["train"], max_train_tokens), ("test", held_out, max_test_tokens)):
        path = work / f"{name}.npy"
        if not path.exists():
            dm = ActivationDataModule(shards, batch_size_tokens=65536, shuffle_buffer_tokens=65536, num_workers=0)
            dm.setup("fit")
            rows = [
                b["acts"].to(torch.float16).numpy()
                for split in splits
                for b in dm.eval_dataset(split, rank=0, world_size=1, max_tokens=cap)
            ]
            tmp = work / f"{name}.tmp.npy"
            np.save(tmp, np.concatenate(rows))
            os.replace(tmp, path)
        out[name] = np.load(path, mmap_mode="r")
    return out["train"], out["test"]


def batch_order(n_rows: int, batch_size: int, total_tokens: int, seed: int) -> np.ndarray:
    """(steps, batch_size) int64 row indices: ``total_tokens // batch_size`` batches cut from successive random
    permutations of the ``n_rows`` training rows (a new permutation per epoch; a batch may straddle two epochs).

    Raises ValueError when ``total_tokens < batch_size`` or there are no rows."""
    if n_rows <= 0 or total_tokens < batch_size:
        raise ValueError(f"need rows ({n_rows}) and at least one batch of {batch_size} tokens ({total_tokens})")
    steps = total_tokens // batch_size
    rng = np.random.default_rng(seed)
    epochs = math.ceil(steps * batch_size / n_rows)
    flat = np.concatenate([rng.permutation(n_rows) for _ in range(epochs)])[: steps * batch_size]
    return flat.reshape(steps, batch_size).astype(np.int64)


class OrderedBatches(torch.utils.data.Dataset):
    """Batch ``i`` is ``{"acts": train[order[i]]}`` as float32 (rows read in ascending index order: the same set
    of rows, so the same losses, as sparsify's runner reads)."""

    def __init__(self, train: np.ndarray, order: np.ndarray):
        self.train, self.order = train, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"acts": torch.from_numpy(np.ascontiguousarray(self.train[np.sort(self.order[i])])).float()}


# ------------------------------------------------------------------ metrics
@torch.no_grad()
def test_metrics(sae, test: np.ndarray, chunk: int = 8192) -> dict[str, float]:
    """Test NMSE (whole-split variance as denominator), L0 and the fraction of latents never firing on ``test``;
    for a TopK SAE also the fraction never among a token's top 4k positive pre-activations (``dead_fraction_4k``:
    alive there is alive for Multi-TopK's L(4k) term, as sparsify counts it). ``lit_sae.reproduce.measure.
    recon_metrics`` under this table's column names.

    ``sae``: anything with ``encode(x, return_info=True)`` and ``decode(values, indices, info)`` (``TopKSAE``)."""
    from lit_sae.reproduce.measure import recon_metrics

    four_k = getattr(sae, "activation", "topk") == "topk"
    m = recon_metrics(sae, test, chunk, dead_at_4k=four_k)
    out = {"nmse": m["nmse"], "l0": m["l0"], "dead_fraction": m["dead_on_test"]}
    if four_k:
        out["dead_fraction_4k"] = m["dead_on_test_4k"]
    return out


class DeltaCE:
    """Delta CE (nats per token) of an SAE on the first ``n_contexts`` test-split contexts of the harvest."""

    def __init__(self, shards: str, n_contexts: int):
        from lit_sae.data.lm import load_lm
        from lit_sae.eval.report import held_out_contexts, settings_from_manifest

        manifest = json.loads(Path(shards, "manifest.json").read_text())
        self.s = settings_from_manifest(manifest)
        self.lm, tokenizer = load_lm(self.s["model"], gguf_file=self.s["gguf_file"])[:2]
        self.ids = held_out_contexts(self.s, tokenizer, n_contexts)

    def __call__(self, sae) -> float:
        from lit_sae.eval.downstream import downstream_loss

        out = downstream_loss(
            self.lm,
            self.s["hook_point"],
            sae.eval(),
            self.ids,
            first_position=self.s["first_position"],
            norm_threshold=self.s["norm_threshold"],
            ablations=(),
            progress=False,
        )
        return float(out["delta_ce"])


# ------------------------------------------------------------------ lit-sae's side
def quickstart_model_settings(config: Path = HERE.parent / "configs" / "quickstart.yaml") -> dict[str, Any]:
    """The ``model:`` section of the quickstart recipe (lit-sae's default recipe on the embedded default)."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(config))["model"])


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=8e-4", "betas=[0.9,0.99]"]`` -> ``{"lr": 8e-4, "betas": [0.9, 0.99]}`` (values parsed as YAML)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--lit {item!r}: expected KEY=VALUE, e.g. --lit lr=8e-4")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads "8e-4" (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key] = parsed
    return out


@torch.no_grad()
def _apply_extra_levers(module, sample: torch.Tensor, b_pre_init: str, encoder_scale: str) -> None:
    """Initialise from data as ``on_fit_start`` would, then apply the script-level levers (b_pre at the mean instead
    of the geometric median; W_enc rescaled so that alpha = <x - b_pre, d> / <d, d> is 1, d the decoded code)."""
    sae = module.sae
    sae.init_from_data_(sample)
    if b_pre_init == "mean":
        sae.b_pre.copy_(sae.normalize_input(sample)[0].mean(0))
    elif b_pre_init != "median":
        raise ValueError(f"b_pre_init={b_pre_init!r}: expected median or mean")
    if encoder_scale == "data":
        x_n = sae.normalize_input(sample)[0]
        values, indices = sae.encode(sample)
        d = sae._decode_n(values, indices)
        alpha = float(((x_n - sae.b_pre) * d).sum() / d.pow(2).sum())
        sae.W_enc.mul_(alpha)
        log.info("encoder_scale=data: W_enc x %.3f (row norm %.3f)", alpha, float(sae.W_enc.norm(dim=1).mean()))
    elif encoder_scale != "fixed":
        raise ValueError(f"encoder_scale={encoder_scale!r}: expected fixed or data")


def train_lit_sae(train: np.ndarray, order: np.ndarray, settings: dict[str, Any], seed: int):
    """Train ``SAEModule(**settings)`` on ``OrderedBatches(train, order)`` for ``len(order)`` steps; returns the
    module's SAE (the EMA weights when ``ema_decay`` is set), in eval mode on the CPU."""
    import lightning as L

    from lit_sae.train.module import SAEModule

    settings = dict(settings)
    extra = {key: settings.pop(key) for key in EXTRA_LEVERS if key in settings}
    L.seed_everything(seed, verbose=False)
    module = SAEModule(d_in=train.shape[1], export_dir="none", **settings)
    if extra:
        n = min(module.hparams.init_tokens, len(order) * order.shape[1])
        rows = np.sort(order.reshape(-1)[:n])
        _apply_extra_levers(
            module,
            torch.from_numpy(np.asarray(train[rows])).float(),
            extra.get("b_pre_init", "median"),
            extra.get("encoder_scale", "fixed"),
        )
    loader = torch.utils.data.DataLoader(OrderedBatches(train, order), batch_size=None, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(order),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    sae = module.sae
    if module.ema is not None:
        with module.ema.swapped_into(sae):  # the averaged weights, decoder norms folded, as an export holds them
            sae = copy.deepcopy(sae)
    return sae.eval()


# ------------------------------------------------------------------ sparsify's side
def start_sparsify(
    python: str, work: Path, out: Path, n_latents: int, k: int, seed: int, args: list[str], threads: int
) -> subprocess.Popen:
    """Start ``scripts/sparsify_runner.py`` under ``python`` (a Python with eai-sparsify) on ``work``'s data."""
    cmd = [
        python,
        str(HERE / "sparsify_runner.py"),
        "--data",
        str(work),
        "--out",
        str(out),
        "--n-latents",
        str(n_latents),
        "--k",
        str(k),
        "--seed",
        str(seed),
        "--threads",
        str(threads),
        *args,
    ]
    env = dict(os.environ, SPARSIFY_DISABLE_TRITON="1")
    log.info("sparsify: %s", " ".join(cmd))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "w"))


def finish_sparsify(proc: Optional[subprocess.Popen], out: Path):
    """The trained sparsify SAE at ``out`` (loaded by lit-sae), after ``proc`` (None: trained by an earlier run)."""
    from lit_sae.artifacts.load import load_sae

    if proc is not None and proc.wait() != 0:
        raise RuntimeError(f"the sparsify runner failed (exit {proc.returncode}); see {out.with_suffix('.log')}")
    return load_sae(out)


# ------------------------------------------------------------------ summary
def summarize(rows: list[dict[str, Any]], sparsify_args: str) -> str:
    """A markdown table, one line per (lit-sae variant, tokens, batch size): the mean and seed range of the test
    NMSE ratio against sparsify run with ``sparsify_args`` on the same seed's batches, the worst dead fraction and
    the mean delta CEs. Runs trained without sparsify take its result from another row of the same seed and order."""
    ref = {
        (r["seed"], r["tokens"], r["batch_size"]): r
        for r in rows
        if "sparsify_nmse" in r and r["sparsify_args"] == sparsify_args
    }
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["name"], r["tokens"], r["batch_size"]), []).append(r)
    lines = [
        "| lit-sae variant | tokens | batch | seeds | lit NMSE | sparsify NMSE | ratio mean (range) | dead % "
        "lit / sparsify | delta CE lit / sparsify |",
        "|" + "---|" * 9,
    ]
    for (name, tokens, batch), rs in groups.items():
        rs = {r["seed"]: r for r in rs}  # a rerun of a seed replaces it
        pairs = [(r, ref[(seed, tokens, batch)]) for seed, r in sorted(rs.items()) if (seed, tokens, batch) in ref]
        if not pairs:
            continue
        ratios = [r["lit_nmse"] / s["sparsify_nmse"] for r, s in pairs]
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        dce = [(r.get("lit_delta_ce"), s.get("sparsify_delta_ce")) for r, s in pairs]
        dce_txt = (
            f"{mean([a for a, _ in dce]):.4f} / {mean([b for _, b in dce]):.4f}"
            if all(a is not None and b is not None for a, b in dce)
            else "-"
        )
        lines.append(
            f"| {name} | {tokens:,} | {batch} | {len(pairs)} | {mean([r['lit_nmse'] for r, _ in pairs]):.4f} | "
            f"{mean([s['sparsify_nmse'] for _, s in pairs]):.4f} | {mean(ratios):.3f} ({min(ratios):.3f}-"
            f"{max(ratios):.3f}) | {100 * max(r['lit_dead_fraction'] for r, _ in pairs):.2f} / "
            f"{100 * max(s['sparsify_dead_fraction'] for _, s in pairs):.2f} | {dce_txt} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="a harvest folder (manifest.json + shards)")
    p.add_argument("--work", required=True, help="folder for the materialised splits, batch orders and SAEs")
    p.add_argument("--tokens", type=int, default=800_000, help="training tokens of each side")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step (both sides)")
    p.add_argument("--n-latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--max-train-tokens", type=int, default=None, help="read at most this many train-split rows")
    p.add_argument(
        "--held-out",
        nargs="+",
        default=["test"],
        help="splits never trained on, scored as the test set (a small harvest: test val)",
    )
    p.add_argument("--lit", nargs="*", default=[], help="SAEModule overrides of quickstart's model settings, KEY=VALUE")
    p.add_argument("--name", default=None, help="a name for this lit-sae variant in the output")
    p.add_argument("--sparsify-python", default=None, help="a Python with eai-sparsify; omit to train lit-sae only")
    p.add_argument("--sparsify-args", default="", help="extra runner arguments, e.g. '--warmup-steps 20'")
    p.add_argument("--delta-ce-contexts", type=int, default=0, help="test contexts for delta CE (0: skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per side (the two sides run in parallel)")
    p.add_argument("--results", default=None, help="append one JSON line per run to this file")
    p.add_argument("--summary", action="store_true", help="print the table of --results and exit (no training)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.summary:
        rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
        sys.stdout.write(summarize(rows, args.sparsify_args) + "\n")
        return rows
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train, test = prepare_data(args.shards, work, args.max_train_tokens, held_out=tuple(args.held_out))
    settings = {**quickstart_model_settings(), **parse_overrides(args.lit), "n_latents": args.n_latents, "k": args.k}
    dce = DeltaCE(args.shards, args.delta_ce_contexts) if args.delta_ce_contexts else None
    results = []
    for seed in args.seeds:
        order = batch_order(len(train), args.batch_size, args.tokens, seed)
        run_dir = work / f"b{args.batch_size}_t{args.tokens}_s{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        np.save(run_dir / "order.npy", order)
        link = run_dir / "train.npy"
        if not link.exists():
            link.symlink_to((work / "train.npy").resolve())
        proc = None
        sp_out = run_dir / ("sparsify_" + "_".join(args.sparsify_args.split()).replace("-", ""))
        if args.sparsify_python and not (sp_out / "sae.safetensors").exists():
            proc = start_sparsify(
                args.sparsify_python,
                run_dir,
                sp_out,
                args.n_latents,
                args.k,
                seed,
                args.sparsify_args.split(),
                args.threads,
            )
        t0 = time.perf_counter()
        row = {
            "name": args.name or " ".join(args.lit) or "quickstart",
            "lit": parse_overrides(args.lit),
            "seed": seed,
            "tokens": args.tokens,
            "batch_size": args.batch_size,
            "sparsify_args": args.sparsify_args,
        }
        sae = train_lit_sae(train, order, settings, seed)
        row["lit_s"] = time.perf_counter() - t0
        row.update({f"lit_{k}": v for k, v in test_metrics(sae, test).items()})
        if dce is not None:
            row["lit_delta_ce"] = dce(sae)
        if args.sparsify_python:
            sp = finish_sparsify(proc, sp_out)
            row.update({f"sparsify_{k}": v for k, v in test_metrics(sp, test).items()})
            row["ratio"] = row["lit_nmse"] / row["sparsify_nmse"]
            if dce is not None:
                row["sparsify_delta_ce"] = dce(sp)
        results.append(row)
        line = json.dumps(row)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if args.results:
            with open(args.results, "a") as f:
                f.write(line + "\n")
    return results


if __name__ == "__main__":
    main()
