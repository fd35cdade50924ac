"""Probe loss: how well a single latent predicts simple token-level properties of the text.

Labels come for free from the text itself:

- Python source, through the standard ``tokenize`` module: inside a string literal, inside a comment, inside a
  docstring, a number, a keyword, the first token of an indented block, the name after ``def``/``class``, an
  operator.
- Prose (any text, from the token's own characters): a capitalised word, punctuation, a digit.

For each task and each feature (an SAE latent, or a raw activation dimension as the reference) a one-dimensional
logistic regression p(y=1) = sigmoid(w * f + b) is fitted on a training split of the contexts; the feature with the
lowest training cross-entropy is kept and its cross-entropy on the held-out contexts is reported (selection on the
training split, so the reported number is not optimistically biased by choosing among thousands of latents).
To keep this cheap, only the ``n_candidates`` features most correlated with the label are fitted.
"""

from __future__ import annotations

import io
import keyword
import logging
import math
import string
import tokenize
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lit_sae.data.lm import truncated_forward
from lit_sae.eval.downstream import splice_mask
from lit_sae.sae.checks import check_probe_data

log = logging.getLogger(__name__)

PYTHON_TASKS = ("py_string", "py_comment", "py_docstring", "py_number", "py_keyword", "py_block_start",
                "py_def_name", "py_operator")
PROSE_TASKS = ("prose_capitalized", "prose_punctuation", "prose_digit")
TASKS = PYTHON_TASKS + PROSE_TASKS

__all__ = ["TASKS", "python_char_labels", "token_labels", "fit_1d_logistic", "best_1d_probe", "probe_dataset",
           "probe_loss"]


# ----------------------------------------------------------------------------------------------- labels
def python_char_labels(source: str) -> dict[str, np.ndarray] | None:
    """Per-character bool labels (len(source),) for the Python tasks; None when ``tokenize`` rejects the source."""
    n = len(source)
    labels = {t: np.zeros(n, dtype=bool) for t in PYTHON_TASKS}
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def offset(rc):
        return line_starts[rc[0] - 1] + rc[1]

    try:
        toks = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    trivia = {tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.ENCODING}
    string_types = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE",
                                                                       "FSTRING_END") if hasattr(tokenize, n)}
    # Logical lines (lists of significant tokens) let us find docstrings: a line made of one string only, that is
    # the first statement of the module or follows a `def`/`class` header.
    lines: list[list[tokenize.TokenInfo]] = [[]]
    after_indent = False
    prev_sig = None
    for tok in toks:
        a, b = offset(tok.start), offset(tok.end)
        if tok.type in string_types:
            labels["py_string"][a:b] = True
        elif tok.type == tokenize.COMMENT:
            labels["py_comment"][a:b] = True
        elif tok.type == tokenize.NUMBER:
            labels["py_number"][a:b] = True
        elif tok.type == tokenize.NAME and keyword.iskeyword(tok.string):
            labels["py_keyword"][a:b] = True
        elif tok.type == tokenize.OP:
            labels["py_operator"][a:b] = True
        if tok.type == tokenize.NAME and prev_sig is not None and prev_sig.string in ("def", "class"):
            labels["py_def_name"][a:b] = True
        if tok.type == tokenize.INDENT:
            after_indent = True
        elif tok.type not in trivia:
            if after_indent:
                labels["py_block_start"][a:b] = True
                after_indent = False
            prev_sig = tok
            lines[-1].append(tok)
        if tok.type == tokenize.NEWLINE:
            lines.append([])
    prev: list[tokenize.TokenInfo] | None = None
    for line in lines:
        if not line:
            continue
        if len(line) == 1 and line[0].type == tokenize.STRING:
            header = prev is None or (prev[0].string in ("def", "class", "async") and prev[-1].string == ":")
            if header:
                labels["py_docstring"][offset(line[0].start) : offset(line[0].end)] = True
        prev = line
    return labels


def _prose_token_labels(text: str) -> dict[str, bool]:
    s = text.strip()
    return {
        "prose_capitalized": bool(s) and s[0].isupper() and s.isalpha(),
        "prose_punctuation": bool(s) and all(c in string.punctuation for c in s),
        "prose_digit": any(c.isdigit() for c in s),
    }


def _token_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each token's (start, end) character span."""
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        # Slow tokenizers have no offsets: rebuild them from the decoded pieces (exact for byte-level BPE on
        # ASCII text; a piece that does not decode to the next characters gets an empty span and no labels).
        ids = tokenizer(text)["input_ids"]
        spans, pos = [], 0
        for i in ids:
            piece = tokenizer.decode([i])
            if piece and text.startswith(piece, pos):
                spans.append((pos, pos + len(piece)))
                pos += len(piece)
            else:
                spans.append((pos, pos))
        return ids, spans


def token_labels(tokenizer, text: str, python: bool = True) -> tuple[list[int], np.ndarray]:
    """Token ids of ``text`` and labels (n_tokens, len(TASKS)) bool.

    A token takes the character label at its first non-space character. Python tasks are all False when
    ``python`` is False or the text does not tokenize as Python."""
    ids, spans = _token_spans(tokenizer, text)
    out = np.zeros((len(ids), len(TASKS)), dtype=bool)
    chars = python_char_labels(text) if python else None
    for j, (a, b) in enumerate(spans):
        piece = text[a:b]
        first = a + (len(piece) - len(piece.lstrip())) if piece.strip() else a
        if chars is not None and a < b:
            for t, name in enumerate(PYTHON_TASKS):
                out[j, t] = chars[name][min(first, len(text) - 1)]
        for name, v in _prose_token_labels(piece).items():
            out[j, TASKS.index(name)] = v
    return ids, out


# ----------------------------------------------------------------------------------------------- fitting
def _ce(s: Tensor, y: Tensor) -> Tensor:
    """Mean logistic cross-entropy per column: s (N, C) logits, y (N,) in {0, 1}."""
    return (torch.nn.functional.softplus(s) - y[:, None] * s).mean(0)


def fit_1d_logistic(z: Tensor, y: Tensor, *, l2: float = 1e-4,
                    iters: int = 50) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit p(y) = sigmoid(w * (z - mu) / sd + b) independently for every column of z (N, C); y (N,) in {0, 1}.

    Newton's method on the two parameters of each column with step halving (float64); ``l2`` is a small ridge
    on w (standardised units) that keeps separable columns finite. Returns (w, b, mu, sd), each (C,)."""
    z = z.double()
    y = y.double()
    mu, sd = z.mean(0), z.std(0).clamp_min(1e-12)
    zs = (z - mu) / sd
    prior = y.mean().clamp(1e-6, 1 - 1e-6)
    w = torch.zeros(z.shape[1], dtype=torch.float64)
    b = torch.full_like(w, math.log(prior / (1 - prior)))

    def objective(w, b):
        return _ce(zs * w + b, y) + 0.5 * l2 * w * w

    loss = objective(w, b)
    for _ in range(iters):
        s = zs * w + b
        p = torch.sigmoid(s)
        r, h = p - y[:, None], p * (1 - p)
        gw, gb = (r * zs).mean(0) + l2 * w, r.mean(0)
        hww, hwb, hbb = (h * zs * zs).mean(0) + l2, (h * zs).mean(0), h.mean(0) + 1e-12
        det = (hww * hbb - hwb * hwb).clamp_min(1e-30)
        dw, db = (hbb * gw - hwb * gb) / det, (hww * gb - hwb * gw) / det
        step = torch.ones_like(w)
        for _ in range(20):  # halve the step where it does not decrease the objective
            new = objective(w - step * dw, b - step * db)
            bad = new > loss
            if not bad.any():
                break
            step = torch.where(bad, step / 2, step)
        new = objective(w - step * dw, b - step * db)
        ok = new <= loss
        w, b = torch.where(ok, w - step * dw, w), torch.where(ok, b - step * db, b)
        improved = (loss - torch.where(ok, new, loss)).max()
        loss = torch.where(ok, new, loss)
        if improved < 1e-10:
            break
    return w, b, mu, sd


def _logits(z: Tensor, w, b, mu, sd) -> Tensor:
    return (z.double() - mu) / sd * w + b


def _top_correlated(z: Tensor, y: Tensor, n: int) -> Tensor:
    """Indices of the n columns of z (N, C) with the largest |correlation| with y (constant columns last)."""
    z = z.double()
    y = y.double() - y.double().mean()
    zc = z - z.mean(0)
    corr = (zc * y[:, None]).sum(0).abs() / (zc.norm(dim=0) * y.norm()).clamp_min(1e-30)
    return corr.topk(min(n, z.shape[1])).indices


def best_1d_probe(
    z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor, *, n_candidates: int = 32, l2: float = 1e-4
) -> dict:
    """The best single feature (by training CE) of z (N, C) for labels y; its held-out CE.

    Returns {"feature": int, "train_ce": float, "test_ce": float, "prior_ce": float (held-out CE of predicting
    the training base rate)}."""
    cand = _top_correlated(z_train, y_train, n_candidates)
    w, b, mu, sd = fit_1d_logistic(z_train[:, cand], y_train, l2=l2)
    train_ce = _ce(_logits(z_train[:, cand], w, b, mu, sd), y_train.double())
    j = int(train_ce.argmin())
    test_ce = _ce(_logits(z_test[:, cand[j : j + 1]], w[j : j + 1], b[j : j + 1], mu[j : j + 1], sd[j : j + 1]),
                  y_test.double())
    prior = float(y_train.double().mean().clamp(1e-6, 1 - 1e-6))
    yt = y_test.double()
    prior_ce = float(-(yt * math.log(prior) + (1 - yt) * math.log(1 - prior)).mean())
    return {"feature": int(cand[j]), "train_ce": float(train_ce[j]), "test_ce": float(test_ce[0]),
            "prior_ce": prior_ce}


# ----------------------------------------------------------------------------------------------- data
@torch.no_grad()
def probe_dataset(
    model: nn.Module,
    tokenizer,
    hook_point: str,
    documents: Iterable[str],
    *,
    context_length: int,
    n_contexts: int = 256,
    first_position: int = 1,
    norm_threshold: float | None = None,
    batch_size: int = 16,
    python: bool | Callable[[str], bool] = True,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Activations and labels for probing: {"acts": (N, d) float32, "labels": (N, n_tasks) bool,
    "context": (N,) int64}. Documents are tokenized whole (labels need the whole file), cut into windows of
    ``context_length`` tokens, and run through the LM up to the hook; positions as in the downstream loss."""
    rows, labs = [], []
    for doc in documents:
        is_py = python(doc) if callable(python) else python
        ids, lab = token_labels(tokenizer, doc, python=is_py)
        for start in range(0, len(ids) - context_length + 1, context_length):
            rows.append(ids[start : start + context_length])
            labs.append(lab[start : start + context_length])
            if len(rows) >= n_contexts:
                break
        if len(rows) >= n_contexts:
            break
    if not rows:
        raise ValueError(f"no document has {context_length} tokens: nothing to probe")
    ids = torch.tensor(rows, dtype=torch.long)
    labels = torch.from_numpy(np.stack(labs))
    device = next(model.parameters()).device
    acts, lab_out, ctx = [], [], []
    for start in tqdm(range(0, len(ids), batch_size), desc="probe activations", disable=not progress):
        a = truncated_forward(model, ids[start : start + batch_size].to(device), hook_point)
        m = splice_mask(a, first_position, norm_threshold)
        acts.append(a[m].float().cpu())
        lab_out.append(labels[start : start + batch_size][m.cpu()])
        ctx.append(torch.arange(start, start + len(a))[:, None].expand_as(m.cpu())[m.cpu()])
    return {"acts": torch.cat(acts), "labels": torch.cat(lab_out), "context": torch.cat(ctx)}


@torch.no_grad()
def _sae_code_columns(sae: nn.Module, acts: Tensor, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Sparse code of acts: (values (N, k) float32, indices (N, k)), on the CPU."""
    p = next(iter(sae.parameters()), None)
    vals, idx = [], []
    for start in range(0, len(acts), batch_size):
        x = acts[start : start + batch_size]
        if p is not None:
            x = x.to(p.device, p.dtype)
        v, i = sae.encode(x)
        vals.append(v.float().cpu())
        idx.append(i.cpu())
    return torch.cat(vals), torch.cat(idx)


def _dense_columns(values: Tensor, indices: Tensor, cols: Tensor) -> Tensor:
    """(N, len(cols)) dense code restricted to the latents ``cols``."""
    hit = indices[:, :, None] == cols[None, None, :]
    return (values[:, :, None] * hit).sum(1)


def _latent_correlation(values: Tensor, indices: Tensor, y: Tensor, n_latents: int) -> Tensor:
    """|corr(latent activation, y)| for every latent, from the sparse code (no dense (N, n_latents) matrix)."""
    n = len(y)
    yc = y.double() - y.double().mean()
    flat_i, flat_v = indices.flatten(), values.double().flatten()
    s1 = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, flat_i, flat_v)
    s2 = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, flat_i, flat_v * flat_v)
    sy = torch.zeros(n_latents, dtype=torch.float64).index_add_(0, flat_i, (values.double() * yc[:, None]).flatten())
    var = (s2 - s1 * s1 / n).clamp_min(0)
    return sy.abs() / (var.sqrt() * yc.norm()).clamp_min(1e-30)


def probe_loss(
    sae: nn.Module,
    data: dict[str, Tensor],
    *,
    test_fraction: float = 0.3,
    n_candidates: int = 32,
    min_positives: int = 5,
    seed: int = 0,
    tasks: tuple[str, ...] = TASKS,
    progress: bool = True,
) -> dict:
    """Probe loss of the SAE's latents (and, as reference, of the raw activation dimensions) on ``data``
    (from :func:`probe_dataset`). Contexts are split into train/test (``test_fraction`` held out).

    Returns {"tasks": {task: {"sae_ce", "sae_latent", "raw_ce", "raw_dim", "prior_ce", "positive_rate",
    "n_train", "n_test"}}, "mean_sae_ce", "mean_raw_ce", "mean_prior_ce", "n_tasks"}; a task with fewer than
    ``min_positives`` positive (or negative) tokens in either split is reported with ``skipped`` and left out
    of the means.

    Raises:
        ValueError: ``data`` lacks acts / labels / context or their row counts differ."""
    check_probe_data(data)
    acts, labels, ctx = data["acts"], data["labels"], data["context"]
    g = torch.Generator().manual_seed(seed)
    contexts = ctx.unique()
    perm = contexts[torch.randperm(len(contexts), generator=g)]
    test_ctx = perm[: max(1, round(test_fraction * len(contexts)))]
    is_test = torch.isin(ctx, test_ctx)
    values, indices = _sae_code_columns(sae, acts)
    n_latents = int(getattr(sae, "n_latents", 0) or int(indices.max()) + 1)
    results: dict[str, dict] = {}
    for name in tqdm(tasks, desc="probes", disable=not progress):
        y = labels[:, TASKS.index(name)].double()
        ytr, yte = y[~is_test], y[is_test]
        counts = [int(ytr.sum()), int((1 - ytr).sum()), int(yte.sum()), int((1 - yte).sum())]
        if min(counts) < min_positives:
            results[name] = {"skipped": f"too few positives/negatives (train {counts[:2]}, test {counts[2:]})"}
            continue
        corr = _latent_correlation(values[~is_test], indices[~is_test], ytr, n_latents)
        cols = corr.topk(min(n_candidates, n_latents)).indices
        z = _dense_columns(values, indices, cols)
        sae_res = best_1d_probe(z[~is_test], ytr, z[is_test], yte, n_candidates=n_candidates)
        raw_res = best_1d_probe(acts[~is_test], ytr, acts[is_test], yte, n_candidates=n_candidates)
        results[name] = {"sae_ce": sae_res["test_ce"], "sae_latent": int(cols[sae_res["feature"]]),
                         "raw_ce": raw_res["test_ce"], "raw_dim": raw_res["feature"],
                         "prior_ce": sae_res["prior_ce"], "positive_rate": float(y.mean()),
                         "n_train": int((~is_test).sum()), "n_test": int(is_test.sum())}
    done = [r for r in results.values() if "skipped" not in r]
    mean = lambda key: float(np.mean([r[key] for r in done])) if done else math.nan  # noqa: E731
    return {"tasks": results, "mean_sae_ce": mean("sae_ce"), "mean_raw_ce": mean("raw_ce"),
            "mean_prior_ce": mean("prior_ce"), "n_tasks": len(done)}
