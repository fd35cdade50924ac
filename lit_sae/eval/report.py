"""The evaluation suite run from a harvest manifest, and the report it writes (report.json, report.md).

The manifest says which LM, hook point, tokenizer, text source and split assignment produced the activations, so the
held-out text is rebuilt exactly: downstream loss and ablation sparsity run on contexts of the *test* split (the same
contexts, cut the same way, as the test activations); probes need whole files (``tokenize`` labels depend on the
whole file), so they use documents the harvest never reached when the source has any left, else all documents
(``probe_text`` in the report says which).
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lit_sae.eval.ablation import ablation_sparsity
from lit_sae.eval.downstream import downstream_loss, mean_activation
from lit_sae.eval.probes import probe_dataset, probe_loss
from lit_sae.fsync import atomic_write
from lit_sae.safe_io import dumps_json

log = logging.getLogger(__name__)

__all__ = ["EvalSettings", "settings_from_manifest", "held_out_contexts", "probe_documents", "run_eval_suite",
           "write_report", "render_markdown"]


class EvalSettings(dict):
    """What the suite needs from a manifest: model, gguf_file, hook_point, context_length, first_position,
    norm_threshold, source, text_field, shuffle_seed, max_contexts_per_document, n_contexts (harvested),
    seed, val_fraction, test_fraction; and what the harvest recorded of its inputs, which every rebuild of its text
    is checked against (``lit_sae.data.identity.verify_text``): inputs, source_sha256, source_documents,
    manifest_path."""


def settings_from_manifest(manifest, manifest_path: Optional[str] = None) -> EvalSettings:
    """Read the evaluation settings out of a harvest manifest (a :class:`~lit_sae.data.manifest.Manifest` or its JSON
    dict; docs/shard-format.md describes the fields); ``manifest_path`` names it in messages."""
    from dataclasses import asdict

    from lit_sae.data.contexts import first_position
    from lit_sae.data.manifest import Exclusions, Manifest, SourceInfo

    m = Manifest.from_json(manifest)
    cfg = m.config
    exc = m.exclusions or Exclusions()
    L = int(m.context_length)
    first = first_position(exc.drop_first_position)
    mult, median = exc.norm_filter_multiple, exc.norm_median
    total = cfg.get("total_tokens")
    return EvalSettings(
        model=m.lm_name, gguf_file=m.lm.gguf_file,
        hook_point=m.hook_point, context_length=L, first_position=first,
        norm_threshold=float(mult * median) if mult is not None and median is not None else None,
        source=cfg.get("source", (m.source or SourceInfo()).name or "stdlib"),
        text_field=cfg.get("text_field", "text"), hf_split=cfg.get("hf_split", "train"),
        hf_config=cfg.get("hf_config"),
        shuffle_seed=cfg.get("seed", 0) if cfg.get("shuffle_documents", True) else None,
        max_contexts_per_document=cfg.get("max_contexts_per_document"),
        n_contexts=math.ceil(total / (L - first)) if total else None,
        seed=cfg.get("seed", 0), val_fraction=cfg.get("val_fraction", 0.05),
        test_fraction=cfg.get("test_fraction", 0.05),
        inputs=asdict(m.inputs) if m.inputs else None, source_sha256=(m.source or SourceInfo()).sha256,
        source_documents=(m.source or SourceInfo()).documents, manifest_path=manifest_path,
    )


def _text(settings: EvalSettings, tokenizer=None):
    """The harvest's text source, reopened and verified to be what the harvest read (and ``tokenizer`` to be the
    one it cut contexts with): every consumer of held-out text opens it here. Raises ValueError otherwise."""
    from lit_sae.data.identity import verify_text
    from lit_sae.data.text import open_source

    text = open_source(settings["source"], text_field=settings["text_field"], shuffle_seed=settings["shuffle_seed"],
                       hf_split=settings["hf_split"], hf_config=settings["hf_config"])
    verify_text(settings, text, tokenizer)
    return text


def held_out_contexts(settings: EvalSettings, tokenizer, n: int) -> Tensor:
    """The first ``n`` contexts (n, T) int64 of the harvest's test split, rebuilt from the text source.

    Cut by :func:`lit_sae.data.contexts.iter_contexts`, the function harvest used: the same token windows (no special
    tokens added) whose activations the test shards hold; positions before ``settings["first_position"]`` were not
    stored. Raises ValueError when the source yields no test-split context.
    """
    from lit_sae.data.contexts import split_contexts

    rows = [ids for _, ids in split_contexts(
        tokenizer, _text(settings, tokenizer).documents(), "test", n, context_length=settings["context_length"],
        n_contexts=settings["n_contexts"], max_contexts_per_document=settings["max_contexts_per_document"],
        seed=settings["seed"], val_fraction=settings["val_fraction"], test_fraction=settings["test_fraction"])]
    if not rows:
        raise ValueError("no test-split context could be rebuilt from the manifest's text source")
    if len(rows) < n:
        log.warning("only %d held-out contexts available (asked for %d)", len(rows), n)
    return torch.tensor(rows, dtype=torch.long)


def probe_documents(settings: EvalSettings, tokenizer, n_tokens: int) -> tuple[list[str], str]:
    """Whole documents with about ``n_tokens`` tokens for probing, and a note saying where they come from."""
    from lit_sae.data.contexts import tokenize

    L, cap = settings["context_length"], settings["max_contexts_per_document"]
    total = settings["n_contexts"]
    seen_contexts, unseen, everything, got = 0, [], [], 0
    for doc in _text(settings, tokenizer).documents():
        if total is not None and seen_contexts >= total:
            unseen.append(doc)
            got += len(doc) // 4  # rough token estimate; probe_dataset stops at its own context budget
            if got >= 2 * n_tokens:
                break
            continue
        n = len(tokenize(tokenizer, doc)) // L
        seen_contexts += min(n, cap) if cap is not None else n
        if len(everything) < 4 * n_tokens // L:
            everything.append(doc)
    if unseen:
        return unseen, "documents after the harvested part of the source (never seen in training)"
    return everything, "documents of the harvested source (partly seen in training: the harvest used it all)"


def run_eval_suite(
    sae: nn.Module,
    manifest: dict,
    *,
    lm=None,
    downstream: bool = True,
    n_contexts: int = 64,
    probes: bool = True,
    probe_contexts: int = 256,
    ablation: bool = True,
    n_ablation_latents: int = 64,
    ablation_contexts_per_latent: int = 4,
    mean: Tensor | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    on_section: Optional[Callable[[str, dict], None]] = None,
    explain: bool = True,
    explain_contexts: int = 256,
    target_manifest: dict | None = None,
) -> dict:
    """Downstream loss, probe loss, ablation sparsity and explainability of ``sae`` on the manifest's held-out text.

    ``lm``: an already loaded (model, tokenizer); loaded from the manifest otherwise. ``mean``: the mean
    activation for mean ablation (e.g. from the test split); computed on the evaluation contexts when None.
    ``on_section(name, result)`` is called as each section finishes (e.g. to write the report so far); every
    section's dict carries ``seconds``, its wall time.
    ``explain``: N2G precision/recall (:mod:`lit_sae.eval.explain`) on ``explain_contexts`` test contexts.

    A transcoder (``sae.d_out``): ``manifest`` is its input hook's, ``target_manifest`` its target's (required); the
    downstream loss replaces the target activation by the prediction from the input of the same forward
    (``downstream_loss``'s ``input_hook_point``); probes and N2G read its code of the input; ablation sparsity
    (an SAE's latent ablated in its own reconstruction) is not defined for it and is left out, with a note."""
    from lit_sae.data.lm import load_lm

    s = settings_from_manifest(manifest)
    t = None
    if hasattr(sae, "d_out"):
        if target_manifest is None:
            raise ValueError("run_eval_suite: a transcoder needs target_manifest, the manifest of its target hook")
        t = settings_from_manifest(target_manifest)
    if lm is None:
        lm = load_lm(s["model"], gguf_file=s["gguf_file"], device=device)
    model, tokenizer = lm
    out: dict[str, Any] = {"settings": dict(s)}
    if t is not None:
        out["settings"]["target_hook_point"] = t["hook_point"]
        if ablation:
            out["notes"] = ["ablation sparsity is not computed for a transcoder (it ablates a latent in an SAE's "
                            "reconstruction of its own input)"]
        ablation = False
    common = dict(first_position=s["first_position"], norm_threshold=s["norm_threshold"], batch_size=batch_size,
                  progress=progress)
    was_training = sae.training
    sae.eval()
    try:
        if downstream or ablation:
            ids = held_out_contexts(s, tokenizer, n_contexts)
        if downstream:
            with timed_section(out, "downstream", on_section):
                where = t or s  # a transcoder's replaced activation is its target's
                if mean is None:
                    mean = mean_activation(model, where["hook_point"], ids, first_position=s["first_position"],
                                           norm_threshold=where["norm_threshold"], batch_size=batch_size)
                extra = {} if t is None else {"input_hook_point": s["hook_point"],
                                              "input_norm_threshold": s["norm_threshold"],
                                              "norm_threshold": t["norm_threshold"]}
                out["downstream"] = downstream_loss(model, where["hook_point"], sae, ids, mean=mean,
                                                    **{**common, **extra})
        if ablation:
            with timed_section(out, "ablation", on_section):
                out["ablation"] = ablation_sparsity(model, s["hook_point"], sae, ids, n_latents=n_ablation_latents,
                                                    contexts_per_latent=ablation_contexts_per_latent, seed=seed,
                                                    **common)
        if probes:
            with timed_section(out, "probes", on_section):
                docs, note = probe_documents(s, tokenizer, probe_contexts * s["context_length"])
                data = probe_dataset(model, tokenizer, s["hook_point"], docs, context_length=s["context_length"],
                                     n_contexts=probe_contexts, python=lambda d: True, **common)
                out["probes"] = probe_loss(sae, data, seed=seed, progress=progress)
                out["probes"]["probe_text"] = note
                out["probes"]["n_tokens"] = int(len(data["acts"]))
        if explain:
            from lit_sae.eval.explain import explainability

            with timed_section(out, "explainability", on_section):
                out["explainability"] = explainability(model, s["hook_point"], sae,
                                                       held_out_contexts(s, tokenizer, explain_contexts), **common)
    finally:
        sae.train(was_training)
    return out


@contextmanager
def timed_section(report: dict, name: str, on_section: Optional[Callable[[str, dict], None]] = None):
    """Time the block that fills ``report[name]`` (a dict): store its wall time as ``report[name]["seconds"]``,
    then call ``on_section(name, report[name])`` (e.g. to write the report so far)."""
    start = time.perf_counter()
    yield
    section = report.setdefault(name, {})
    section["seconds"] = round(time.perf_counter() - start, 3)
    log.info("%s done in %.1f s", name, section["seconds"])
    if on_section is not None:
        on_section(name, section)


def _took(section: dict) -> str:
    """' (12.3 s)' for a section that recorded its wall time, else ''."""
    seconds = section.get("seconds") if isinstance(section, dict) else None
    return f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else ""


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return x.tolist() if x.numel() != 1 else x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _fmt(x, digits=4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if math.isfinite(x) else str(x)
    return str(x)


def render_markdown(report: dict) -> str:
    """A short human-readable summary of a report dict."""
    lines = ["# lit-sae evaluation report", ""]
    if report.get("complete") is False:
        pending = ", ".join(report.get("pending", [])) or "?"
        lines += [f"**Incomplete**: sections still running or interrupted: {pending}", ""]
    if report.get("checkpoint"):
        lines += [f"Checkpoint: `{report['checkpoint'].get('path')}` (sha256 `{report['checkpoint'].get('sha256')}`)",
                  ""]
    m = report.get("metrics", {})
    if m:
        lines += [f"## Reconstruction and sparsity (test split){_took(m)}", "", "| metric | value |", "|---|---|"]
        for k in ("nmse", "relative_mse", "l0", "dead_fraction", "n_tokens"):
            if k in m:
                lines.append(f"| {k} | {_fmt(m[k])} |")
        lines.append("")
    d = report.get("downstream")
    if d:
        what = (f"transcoder's prediction from {d['input_hook_point']} replacing {d.get('hook_point')}"
                if d.get("input_hook_point") else "SAE spliced into the LM")
        lines += [f"## Downstream loss ({what}){_took(d)}", "", "| metric | value |", "|---|---|"]
        for k in ("clean_ce", "sae_ce", "delta_ce", "kl_sae", "zero_ce", "mean_ce", "frac_recovered",
                  "frac_recovered_mean", "n_tokens"):
            if k in d:
                lines.append(f"| {k} | {_fmt(d[k])} |")
        lines.append("")
    p = report.get("probes")
    if p:
        lines += [f"## Probe loss (held-out CE of the best single feature){_took(p)}", "",
                  "| task | SAE latent | CE | raw dim | CE | prior CE |", "|---|---|---|---|---|---|"]
        for name, r in p["tasks"].items():
            if "skipped" in r:
                lines.append(f"| {name} | skipped: {r['skipped']} | | | | |")
            else:
                lines.append(f"| {name} | {r['sae_latent']} | {_fmt(r['sae_ce'])} | {r['raw_dim']} | "
                             f"{_fmt(r['raw_ce'])} | {_fmt(r['prior_ce'])} |")
        lines += [f"| **mean** | | {_fmt(p['mean_sae_ce'])} | | {_fmt(p['mean_raw_ce'])} | "
                  f"{_fmt(p['mean_prior_ce'])} |", "", f"Text: {p.get('probe_text', '')}", ""]
    lines += [f"Note: {note}" for note in report.get("notes", [])] + ([""] if report.get("notes") else [])
    a = report.get("ablation")
    if a:
        lines += [f"## Ablation sparsity ((L1/L2)^2 / (V T) of the logit change over T positions, Gao et al. s4.5; "
                  f"lower is sparser){_took(a)}", "", "| | mean | median |", "|---|---|---|",
                  f"| latents ({a['n_latents']}) | {_fmt(a['mean'])} | {_fmt(a['median'])} |",
                  f"| residual basis directions | {_fmt(a.get('basis_mean'))} | {_fmt(a.get('basis_median'))} |",
                  f"| random directions | {_fmt(a['random_mean'])} | {_fmt(a['random_median'])} |", ""]
    from lit_sae.eval.saebench import saebench_markdown

    lines += saebench_markdown(report.get("saebench_core"))
    if report.get("explainability"):
        from lit_sae.eval.explain import render_markdown_section

        lines += render_markdown_section(report["explainability"])
    if report.get("autointerp"):
        from lit_sae.eval.autointerp_summary import render_autointerp_section

        lines += render_autointerp_section(report["autointerp"])
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """Write report.json (everything, JSON-safe) and report.md into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "report.json", out / "report.md"
    for path, text in ((js, dumps_json(_jsonable(report), nonfinite="null", indent=2)), (md, render_markdown(report))):
        with atomic_write(path, "w", encoding="utf-8") as f:
            f.write(text)
    log.info("evaluation report written to %s and %s", js, md)
    return js, md
