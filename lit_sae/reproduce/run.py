"""``lit-sae reproduce``: train the SAEs of ``lit_sae.reproduce.grid`` in one sweep, measure them, judge each claim
of Gao et al. (2024) and write ``reproduce.json`` (every number), ``reproduce.md`` (the table) and ``figures/*.png``."""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from lit_sae.fsync import atomic_write
from lit_sae.safe_io import dumps_json

log = logging.getLogger(__name__)

__all__ = ["reproduce", "render_markdown"]


def reproduce(harvest: str, out: str, quick: bool = False, seed: int = 0, device: str = "cpu",
              overwrite: bool = False, progress: bool = True) -> str:
    """Reproduce the claims of Gao et al. (2024) on a harvest: figures, reproduce.md and reproduce.json.

    The claims: NMSE-L0 frontier, dead latents, size law, Multi-TopK, delta CE vs NMSE, ablation sparsity.
    Returns the path of reproduce.md.

    Args:
        harvest: a harvest folder (manifest.json + shards, from ``lit-sae harvest``) with train and test splits.
        out: the run folder; reproduce.json, reproduce.md and figures/ are written there.
        quick: the small setting (minutes on 2 CPU cores) instead of the full one (docs/reproduce.md states costs).
        seed: seeds the SAEs' init, the data order and the sampled latents.
        device: where the SAEs train and the LM runs (cpu, cuda).
        overwrite: replace an existing reproduce.json in ``out``.
        progress: progress bars.
    """
    from lit_sae.data.datamodule import ActivationDataModule
    from lit_sae.reproduce.grid import FULL, QUICK, sae_specs
    from lit_sae.reproduce.train import steps_for, train_sweep, train_tokens_of

    root = Path(out)
    if (root / "reproduce.json").exists() and not overwrite:
        raise FileExistsError(f"{root / 'reproduce.json'} exists: choose another out folder or pass --overwrite")
    if not (Path(harvest) / "manifest.json").is_file():
        raise FileNotFoundError(f"harvest={harvest}: no manifest.json there; give the folder `lit-sae harvest` wrote")
    setting = QUICK if quick else FULL
    manifest = ActivationDataModule(harvest).manifest
    steps = steps_for(setting, train_tokens_of(manifest))
    specs, groups, random_init = sae_specs(setting, steps)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timing: dict[str, float] = {}
    log.info("reproduce (%s): %d SAEs, %d steps of %d tokens", setting.name, len(specs), steps,
             setting.batch_size_tokens)
    trained = train_sweep(harvest, root, setting, specs, random_init, steps, seed=seed,
                          accelerator="gpu" if device.startswith("cuda") else "cpu", progress=progress)
    timing["train_s"] = trained["seconds"]
    module = trained["module"].cpu() if not device.startswith("cuda") else trained["module"]
    r: dict[str, Any] = {"harvest": str(harvest), "setting": setting.to_dict(), "groups": groups,
                         "n_saes": len(specs), "train_steps": steps, "train_tokens_per_sae": trained["tokens"],
                         "harvest_train_tokens": train_tokens_of(manifest), "hook_point": manifest.hook_point,
                         "model": manifest.lm_name, "d_in": manifest.d_in, "saes": {}, "seed": seed}
    _measure_reconstruction(r, module, trained["datamodule"], specs, groups, timing)
    _measure_lm(r, module, manifest, setting, groups, device, seed, progress, timing)
    from lit_sae.reproduce.claims import judge_all
    from lit_sae.reproduce.figures import write_figures

    r["claims"] = judge_all(r)
    t = time.perf_counter()
    r["figures"] = {k: os.path.relpath(v, root) for k, v in write_figures(r, root / "figures").items()}
    timing["figures_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - started
    r["timing"] = timing
    r["machine"] = {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), "device": device,
                    "cpu_count": os.cpu_count()}
    _write(root / "reproduce.json", dumps_json(_jsonable(r), nonfinite="null", indent=2))
    md = root / "reproduce.md"
    _write(md, render_markdown(r))
    log.info("reproduction written to %s (%.0f s)", md, timing["total_s"])
    return str(md)


def _measure_reconstruction(r, module, dm, specs, groups, timing) -> None:
    from lit_sae.reproduce.measure import at_k, read_test_split, recon_metrics

    t = time.perf_counter()
    x = read_test_split(dm).to(next(module.parameters()).device)
    r["test_tokens"] = int(len(x))
    for spec in specs:
        name = spec["name"]
        sae = module.members[name].sae
        row = {k: spec.get(k) for k in ("activation", "n_latents", "k", "sparsity_coef", "auxk_coef", "multi_topk")}
        row.update(recon_metrics(sae, x))
        row["dead_fraction"] = float(module.dead_latent_mask(name).float().mean())
        r["saes"][name] = row
    r["multi_topk"] = {}
    for name in groups["multi"]:
        sae = module.members[name].sae
        r["multi_topk"][name] = {}
        for k in (sae.k, 2 * sae.k, 4 * sae.k):  # k' = k, 2k, 4k (the paper's Figure 6 goes further)
            with at_k(sae, k):
                r["multi_topk"][name][str(k)] = recon_metrics(sae, x)["nmse"]
    timing["reconstruction_s"] = time.perf_counter() - t


def _measure_lm(r, module, manifest, setting, groups, device, seed, progress, timing) -> None:
    from lit_sae.data.lm import load_lm
    from lit_sae.eval.ablation import ablation_sparsity
    from lit_sae.eval.probes import probe_dataset, probe_loss
    from lit_sae.eval.report import held_out_contexts, probe_documents, settings_from_manifest
    from lit_sae.reproduce.measure import delta_ce_many

    s = settings_from_manifest(manifest)
    t = time.perf_counter()
    model, tokenizer = load_lm(s["model"], gguf_file=s["gguf_file"], device=device)
    timing["lm_load_s"] = time.perf_counter() - t
    common = dict(first_position=s["first_position"], norm_threshold=s["norm_threshold"], batch_size=8)
    saes = {name: module.members[name].sae for name in r["saes"]}
    t = time.perf_counter()
    ids = held_out_contexts(s, tokenizer, setting.eval_contexts)
    for name, d in delta_ce_many(model, s["hook_point"], saes, ids, progress=progress, **common).items():
        r["saes"][name].update(delta_ce=d["delta_ce"], sae_ce=d["sae_ce"])
        r["clean_ce"], r["delta_ce_tokens"] = d["clean_ce"], d["n_tokens"]
    timing["delta_ce_s"] = time.perf_counter() - t
    t = time.perf_counter()
    docs, note = probe_documents(s, tokenizer, setting.probe_contexts * s["context_length"])
    data = probe_dataset(model, tokenizer, s["hook_point"], docs, context_length=s["context_length"],
                         n_contexts=setting.probe_contexts, python=lambda d: True, progress=progress, **common)
    r["probe_text"], r["probe_tokens"] = note, int(len(data["acts"]))
    for name in groups["sizes"]:
        p = probe_loss(saes[name], data, seed=seed, progress=False)
        r["saes"][name].update(probe_ce=p["mean_sae_ce"], probe_raw_ce=p["mean_raw_ce"],
                               probe_prior_ce=p["mean_prior_ce"], probe_tasks=p["n_tasks"])
    timing["probes_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for name in groups["ablation"]:
        a = ablation_sparsity(model, s["hook_point"], saes[name], ids, n_latents=setting.ablation_latents,
                              contexts_per_latent=setting.ablation_contexts_per_latent, seed=seed,
                              progress=progress, **common)
        r["saes"][name]["ablation"] = {k: v for k, v in a.items() if k != "latents"}
    timing["ablation_s"] = time.perf_counter() - t


def _fmt(v, spec=".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def render_markdown(r: dict[str, Any]) -> str:
    """reproduce.md: the command's setting and cost, the claims table, the per-SAE numbers, the figures."""
    st, tm = r["setting"], r["timing"]
    lines = [f"# Reproduction of Gao et al. (2024) on {r['model']} at {r['hook_point']}", "",
             f"Setting `{st['name']}`: {r['n_saes']} SAEs trained in one sweep for {r['train_steps']} steps of "
             f"{st['batch_size_tokens']} tokens ({r['train_tokens_per_sae']:,} tokens per SAE, "
             f"{r['train_tokens_per_sae'] / r['harvest_train_tokens']:.1f} passes over the harvest's "
             f"{r['harvest_train_tokens']:,} train tokens); test split {r['test_tokens']:,} tokens; d_in {r['d_in']}.",
             f"Wall time {tm['total_s']:.0f} s on {r['machine']['device']} ({r['machine']['torch_threads']} torch "
             "threads): " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in tm.items() if k != "total_s")
             + ".", "", "| claim | paper | measured here | reproduces here? |", "|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['paper']} | {c['measured']} | **{c['verdict']}** |" for c in r["claims"]]
    lines += ["", "## Every SAE (test split)", "",
              "| SAE | activation | n_latents | k | penalty | NMSE | L0 | dead | dead on test | delta CE | probe CE |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["saes"].items():
        k = "-" if s["activation"] in ("relu", "jumprelu") else s["k"]
        lines.append(f"| {name} | {s['activation']} | {s['n_latents']} | {k} | "
                     f"{_fmt(s.get('sparsity_coef'), 'g')} | {_fmt(s['nmse'])} | "
                     f"{s['l0']:.1f} | {s['dead_fraction']:.3f} | {s['dead_on_test']:.3f} | "
                     f"{_fmt(s.get('delta_ce'))} | {_fmt(s.get('probe_ce'))} |")
    lines += ["", f"Clean CE {_fmt(r.get('clean_ce'))} nats on {r.get('delta_ce_tokens')} held-out tokens; probes on "
              f"{r.get('probe_tokens')} tokens ({r.get('probe_text')}).", "",
              "Ablation sparsity follows the paper's s4.5 (one position ablated, logits of the 16 positions from it, "
              "median subtracted per position, (L1/L2)^2 / (V T)); the baseline ablates a residual-stream basis "
              "direction at the same positions.", "", "## Figures", ""]
    lines += [f"![{name}]({path})" for name, path in r["figures"].items()]
    return "\n".join(lines) + "\n"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def _write(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
