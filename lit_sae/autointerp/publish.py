"""Where the results go: results.json, explanations.json (+ delphi's per-latent files), report.json / report.md's
``autointerp`` section, TensorBoard scalars, and the feature browser's data files. Layouts: docs/autointerp.md.

Every file is written to a temporary sibling and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

__all__ = ["RESULTS_FORMAT", "EXPLANATIONS_FORMAT", "write_json", "write_results", "update_report",
           "write_tensorboard", "browser_payload", "write_browser_data", "read_results"]

RESULTS_FORMAT = "lit-sae-autointerp/1"
EXPLANATIONS_FORMAT = "lit-sae-explanations/1"


def write_json(path: Path, obj: Any, indent: Optional[int] = None) -> Path:
    """Write JSON atomically (temporary sibling, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=indent, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_results(out: Path, results: dict[int, dict], summary: dict, meta: dict,
                  reference: Optional[dict[int, dict]] = None) -> dict[str, Path]:
    """``results.json`` (everything), ``explanations.json`` (the explanations and scores, with Neuronpedia's field
    names) and ``delphi/explanations/<hook>_latent<i>.txt`` (a JSON string each, as delphi's explanation loader
    reads). Returns the paths."""
    paths = {"results": write_json(out / "results.json", {
        "format": RESULTS_FORMAT, **meta, "summary": summary,
        "latents": [results[i] for i in sorted(results)],
        "reference": [reference[i] for i in sorted(reference)] if reference else None}, indent=None)}
    src, backend = meta.get("source", {}), summary.get("backend", {})
    rows = []
    for i in sorted(results):
        r = results[i]
        if r.get("explanation") is None:
            continue
        rows.append({"modelId": src.get("model"), "layer": src.get("hook_point"), "index": str(i),
                     "description": r["explanation"], "explanationModelName": backend.get("model"),
                     "typeName": "lit-sae-delphi-default", "status": r["status"],
                     "detection_accuracy": (r.get("detection") or {}).get("accuracy"),
                     "fuzz_accuracy": (r.get("fuzz") or {}).get("accuracy"),
                     "detection_n": (r.get("detection") or {}).get("n"), "fuzz_n": (r.get("fuzz") or {}).get("n")})
    paths["explanations"] = write_json(out / "explanations.json", {
        "format": EXPLANATIONS_FORMAT, "sae": meta.get("sae", {}).get("path"), "explanations": rows}, indent=1)
    hook = str(src.get("hook_point") or "sae")
    for row in rows:
        write_json(out / "delphi" / "explanations" / f"{hook}_latent{row['index']}.txt", row["description"])
    return paths


def read_results(path: str | os.PathLike) -> Optional[dict]:
    """results.json, or None when missing or not lit-sae autointerp results (logged)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exn:
        log.warning("%s: unreadable autointerp results (%s), not shown", p, type(exn).__name__)
        return None
    if data.get("format") != RESULTS_FORMAT:
        log.warning("%s: format %r is not %s, not shown", p, data.get("format"), RESULTS_FORMAT)
        return None
    return data


def update_report(root: Path, summary: dict) -> Optional[Path]:
    """Put ``summary`` into the newest report.json under ``root`` as its ``autointerp`` section and re-render its
    report.md; None when there is no report (the summary is still in results.json)."""
    from lit_sae.eval.report import write_report

    found = sorted(root.glob("**/report.json"), key=lambda q: q.stat().st_mtime)
    found = [p for p in found if "autointerp" not in p.parts[len(root.parts):]]
    if not found:
        log.info("no report.json under %s: the autointerp summary is in results.json only", root)
        return None
    try:
        report = json.loads(found[-1].read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exn:
        log.warning("%s: unreadable report (%s), not updated", found[-1], type(exn).__name__)
        return None
    report["autointerp"] = summary
    write_report(found[-1].parent, report)
    return found[-1]


def write_tensorboard(folder: Path, summary: dict, results: dict[int, dict], step: int = 0) -> None:
    """Scalars ``autointerp/{detection,fuzz}/{mean,median,frac_ge_0.8}`` and histograms of the per-latent
    accuracies into ``folder`` (one event file; ``tensorboard --logdir <run>`` finds it)."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(folder))
    try:
        for name in ("detection", "fuzz"):
            d = summary[name]["accuracy"]
            for k in ("mean", "median", "frac_ge_0.8"):
                if d.get(k) is not None:
                    w.add_scalar(f"autointerp/{name}/{k}", d[k], step)
            acc = [r[name]["accuracy"] for r in results.values() if r.get(name) and r[name]["accuracy"] is not None]
            if acc:
                w.add_histogram(f"autointerp/{name}/accuracy", torch.tensor(acc), step)
    finally:
        w.close()


def browser_payload(data: dict, decode: Optional[Callable[[int], str]] = None) -> dict:
    """The browser's view of results.json: per latent its explanation, scores and scored samples, the summary, and
    the text of every token id the samples use (``decode``; default: the results' own ``vocab``)."""
    vocab = dict(data.get("vocab") or {})
    latents = {}
    for r in data.get("latents", []):
        latents[str(r["latent"])] = {k: r.get(k) for k in ("status", "explanation", "explanation_parsed",
                                                             "detection", "fuzz", "samples", "n_explain_contexts",
                                                             "n_heldout_contexts", "n_explain_examples")}
        if decode is not None:
            for ss in (r.get("samples") or {}).values():
                for s in ss:
                    vocab.update({str(t): decode(t) for t in s["tokens"] if str(t) not in vocab})
    return {"format": data.get("format"), "summary": data.get("summary"), "source": data.get("source"),
            "latents": latents, "vocab": vocab}


def write_browser_data(browser: Path, payload: dict) -> bool:
    """Write ``data/autointerp.json`` and ``js/autointerp.js`` into a feature browser folder (the page shows them
    when present); False when ``browser`` is not a browser folder."""
    if not ((browser / "data" / "summary.json").is_file() and (browser / "js").is_dir()):
        return False
    write_json(browser / "data" / "autointerp.json", payload)
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    js = browser / "js" / "autointerp.js"
    fd, tmp = tempfile.mkstemp(prefix=".autointerp.", dir=js.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"LITSAE.autointerp({text.replace('</', '<' + chr(92) + '/')});\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, js)
    return True
