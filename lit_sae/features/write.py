"""Write the feature browser: the data as JSON (.json / .json.gz, layout in docs/feature-browser.md) and a
self-contained ``index.html`` that reads the same data from ``js/*.js`` copies (browsers refuse ``fetch`` on
``file://``, but load scripts). No file refers to the network. Everything goes to a temporary sibling folder that
is renamed into place at the end, so an interrupted write never leaves a folder that looks complete.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lit_sae.data.detok import decode_runs, token_pieces
from lit_sae.features.collect import FeatureStats
from lit_sae.safe_io import dumps_json

__all__ = ["FORMAT", "CHUNK", "latent_records", "write_browser"]

FORMAT = "lit-sae-features/1"
CHUNK = 256  # latents per data file: a latent's page loads one file of about 256 x 3 KB


def _r(x: float, digits: int = 4) -> float | None:
    """Round to ``digits`` significant digits for compact JSON (None for NaN / inf)."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _sparse_windows(windows: torch.Tensor, ref: torch.Tensor) -> list[list[list[int]]]:
    """Per record (rows of ``windows`` (R, W)): [[offset, permille of ``ref`` (R,)], ...] of its nonzero entries
    (a nonzero activation is at least 1 permille)."""
    R = windows.shape[0]
    permille = (windows / ref.clamp_min(1e-30)[:, None] * 1000).round().long()
    permille = torch.where(windows > 0, permille.clamp_min(1), torch.zeros_like(permille))
    r, j = torch.nonzero(permille, as_tuple=True)
    pairs = torch.stack([j, permille[r, j]], dim=1).tolist()
    ends = torch.cumsum(torch.bincount(r, minlength=R), 0).tolist()
    out, a = [], 0
    for e in ends:
        out.append(pairs[a:e])
        a = e
    return out


def latent_records(stats: FeatureStats, *, logits=None, neighbours=None, n2g=None) -> list[dict]:
    """One JSON-able dict per latent (the layout of ``data/latents/NNNNN.json.gz``, docs/feature-browser.md)."""
    L, n_bands, per_band = stats.band_ctx.shape
    n_top, W = stats.top_ctx.shape[1], stats.top_window.shape[-1]
    before = stats.window[0]
    mx_t = stats.max
    top_acts = _sparse_windows(stats.top_window.reshape(-1, W), mx_t.repeat_interleave(n_top))
    band_acts = _sparse_windows(stats.band_window.reshape(-1, W), mx_t.repeat_interleave(n_bands * per_band))
    density, mean = stats.density.tolist(), stats.mean.tolist()
    top_ctx, top_pos, top_val = stats.top_ctx.tolist(), stats.top_pos.tolist(), stats.top_value.tolist()
    b_ctx, b_pos, b_val = stats.band_ctx.tolist(), stats.band_pos.tolist(), stats.band_value.tolist()
    band_count, hist, mx, count = stats.band_count.tolist(), stats.hist.tolist(), mx_t.tolist(), stats.count.tolist()

    def ctx_entry(c, p, v, acts):
        return {"ctx": c, "pos": p, "value": _r(v), "start": p - before, "acts": acts}

    if logits is not None:
        tv, ti, bv, bi = (t.tolist() for t in logits)
    if neighbours is not None:
        cos, ids = (t.tolist() for t in neighbours)
    if n2g is not None:
        prec, rec_ = n2g.precision.tolist(), n2g.recall.tolist()
        n_fires = n2g.fires_score.tolist()
        n_matched = n2g.matched_score.tolist() if n2g.matched_score is not None else [None] * L
    out = []
    for i in range(L):
        rec: dict[str, Any] = {"id": i, "count": count[i], "density": _r(density[i], 6), "max": _r(mx[i]),
                               "mean": _r(mean[i]), "dead": count[i] == 0,
                               "hist": {"max": _r(mx[i]), "counts": hist[i]}}
        rec["top"] = [ctx_entry(c, p, v, top_acts[i * n_top + j])
                      for j, (c, p, v) in enumerate(zip(top_ctx[i], top_pos[i], top_val[i])) if c >= 0]
        rec["bands"] = [{"lo": _r(mx[i] * b / n_bands), "hi": _r(mx[i] * (b + 1) / n_bands), "count": band_count[i][b],
                         "samples": [ctx_entry(c, p, v, band_acts[(i * n_bands + b) * per_band + j])
                                     for j, (c, p, v) in enumerate(zip(b_ctx[i][b], b_pos[i][b], b_val[i][b]))
                                     if c >= 0]}
                        for b in range(n_bands)]
        if logits is not None:
            rec["logits"] = {"top": [[int(t), _r(v)] for t, v in zip(ti[i], tv[i])],
                             "bottom": [[int(t), _r(v)] for t, v in zip(bi[i], bv[i])]}
        if neighbours is not None:
            rec["neighbours"] = [[int(j), _r(c)] for j, c in zip(ids[i], cos[i])]
        if n2g is not None:
            rec["explanation"] = {"status": n2g.status[i], "precision": _r(prec[i]), "recall": _r(rec_[i]),
                                  "n_matched": n_matched[i], "n_fires": n_fires[i],
                                  "patterns": [{"tokens": t, "support": s} for t, s in n2g.patterns[i][:10]],
                                  "n_patterns": len(n2g.patterns[i])}
        out.append(rec)
    return out


def _token_ids(records: list[dict], contexts: list[list[int]]) -> set[int]:
    ids = {t for row in contexts for t in row}
    for r in records:
        for side in ("top", "bottom"):
            ids.update(t for t, _ in r.get("logits", {}).get(side, []))
        for p in r.get("explanation", {}).get("patterns", []):
            ids.update(t for t in p["tokens"] if t is not None)
    return ids


def _top_tokens(rec: dict, contexts: list[list[int]], vocab: dict[int, str], pieces: list[dict[int, str]],
                n: int = 3) -> list[str]:
    """The most frequent tokens at the max of the latent's top contexts (for the index and its search), as the
    context's decoding shows them (``pieces``), else the token's own text."""
    seen: dict[str, int] = {}
    for c in rec["top"]:
        tok = _shown(c["ctx"], c["pos"], contexts, vocab, pieces)
        seen[tok] = seen.get(tok, 0) + 1
    return [t for t, _ in sorted(seen.items(), key=lambda kv: -kv[1])[:n]]


def _shown(ctx: int, pos: int, contexts: list[list[int]], vocab: dict[int, str], pieces: list[dict[int, str]]) -> str:
    """Token ``pos`` of context ``ctx`` as the context's decoding shows it; a token that only starts a character
    shows the character (the first non-empty piece after it)."""
    row = contexts[ctx]
    if not pieces:
        return vocab.get(row[pos], "")
    for j in range(pos, len(row)):
        text = pieces[ctx].get(j, vocab.get(row[j], ""))
        if text:
            return text
    return ""


def _explanation_text(rec: dict, vocab: dict[int, str], decode: Optional[Callable] = None) -> str:
    """The top N2G patterns, each run of consecutive tokens decoded together when ``decode`` is given."""
    pats = rec.get("explanation", {}).get("patterns", [])
    if decode is None:
        runs = [[None if t is None else vocab.get(t, "?") for t in p["tokens"]] for p in pats[:3]]
    else:
        runs = [decode_runs(decode, p["tokens"]) for p in pats[:3]]
    return " | ".join(" ".join("*" if s is None else dumps_json(s, ensure_ascii=False) for s in r) for r in runs)


def _summary(records: list[dict], contexts, vocab, stats: FeatureStats, meta: dict, pieces, decode) -> dict:
    live = stats.density[stats.count > 0]
    edges = torch.linspace(-8, 0, 33) if live.numel() == 0 else torch.linspace(
        math.floor(float(live.log10().min())), 0, 33)
    hist = torch.histc(live.log10().float(), bins=32, min=float(edges[0]), max=0.0) if live.numel() else torch.zeros(32)
    return {
        "format": FORMAT, **meta, "n_tokens": stats.n_tokens, "n_dead": int((stats.count == 0).sum()),
        "density_histogram": {"log10_edges": [_r(e) for e in edges.tolist()],
                              "counts": [int(c) for c in hist.tolist()]},
        "chunk": CHUNK,
        "latents": {
            "id": [r["id"] for r in records], "count": [r["count"] for r in records],
            "density": [r["density"] for r in records], "max": [r["max"] for r in records],
            "mean": [r["mean"] for r in records],
            "precision": [r.get("explanation", {}).get("precision") for r in records],
            "recall": [r.get("explanation", {}).get("recall") for r in records],
            "status": [r.get("explanation", {}).get("status") for r in records],
            "explanation": [_explanation_text(r, vocab, decode) for r in records],
            "top_tokens": [_top_tokens(r, contexts, vocab, pieces) for r in records],
        },
    }


def _dump(path: Path, obj: Any, js_var: str | None = None, js_dir: Path | None = None, gz: bool = True) -> None:
    text = dumps_json(obj, where=str(path), ensure_ascii=False, separators=(",", ":"))
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wt", encoding="utf-8", compresslevel=6) as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    if js_var is not None and js_dir is not None:
        # "</" cannot end the script early: JSON allows "<\/" for "</"
        (js_dir / (path.name.split(".")[0] + ".js")).write_text(
            f"LITSAE.{js_var}({text.replace('</', '<' + chr(92) + '/')});\n", encoding="utf-8")


def _is_browser(folder: Path) -> bool:
    """True for an empty folder or one holding exactly what :func:`write_browser` writes."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else {"?"}
    return not names or (names == {"index.html", "data", "js"} and (folder / "data" / "summary.json").is_file())


def check_out_dir(out: Path) -> None:
    """ValueError unless ``out`` is new, empty or an earlier feature browser (which ``write_browser`` replaces)."""
    if out.exists() and not _is_browser(out):
        raise ValueError(f"{out}: exists and is not a feature browser written by lit-sae features; choose another "
                         "--out_dir (nothing was written)")


def write_browser(out_dir: str | os.PathLike, records: list[dict], contexts: list[list[int]], vocab: dict[int, str],
                  stats: FeatureStats, meta: dict, tokenizer: Any = None) -> Path:
    """Write the browser folder ``out_dir`` and return the path of its index.html.

    An earlier feature browser in ``out_dir`` is replaced; any other non-empty folder there is never touched
    (ValueError naming it). The folder is written beside ``out_dir`` and renamed into place, with the permissions
    the user's umask gives.

    ``records``: :func:`latent_records`; ``contexts``: token ids of every context the records refer to (by index);
    ``vocab``: token id -> text for the ids used; ``meta``: JSON-able facts about the SAE and the run (``sae``,
    ``source``, ``report``, ``explainability``); ``tokenizer``: the LM's tokenizer (or a ``list[int] -> str``
    decode function): each context is then shown as the tokenizer decodes it, cut at its tokens
    (``lit_sae.data.detok.token_pieces``: a character split over byte-level tokens shows whole, on the token that
    finishes it), stored in ``pieces.json`` as ``{position: text}`` where that differs from the token's own text."""
    out = Path(out_dir)
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        data, js = tmp / "data", tmp / "js"
        (data / "latents").mkdir(parents=True)
        js.mkdir()
        used = _token_ids(records, contexts)
        vocab_used = {str(t): vocab.get(t, f"<{t}>") for t in sorted(used)}
        ids_text = {int(k): v for k, v in vocab_used.items()}
        pieces = [] if tokenizer is None else [
            {j: p for j, (t, p) in enumerate(zip(row, token_pieces(tokenizer, row))) if p != ids_text.get(t)}
            for row in contexts]
        summary = _summary(records, contexts, ids_text, stats, meta, pieces, tokenizer)
        _dump(data / "summary.json", summary, "summary", js, gz=False)
        _dump(data / "vocab.json", vocab_used, "vocab", js)
        _dump(data / "contexts.json", contexts, "contexts", js)
        _dump(data / "pieces.json", [{str(j): p for j, p in row.items()} for row in pieces], "pieces", js)
        for s in range(0, len(records), CHUNK):
            name = f"{s // CHUNK:05d}"
            _dump(data / "latents" / f"{name}.json", records[s:s + CHUNK], None)
            text = dumps_json(records[s:s + CHUNK], where=f"latents-{name}.js", ensure_ascii=False,
                              separators=(",", ":"))
            (js / f"latents-{name}.js").write_text(
                f"LITSAE.chunk({s // CHUNK},{text.replace('</', '<' + chr(92) + '/')});\n", encoding="utf-8")
        page = resources.files("lit_sae.features").joinpath("static", "index.html").read_text(encoding="utf-8")
        (tmp / "index.html").write_text(page, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"
