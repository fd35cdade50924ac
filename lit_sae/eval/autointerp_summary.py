"""The evaluation report's ``autointerp`` section: the distribution over latents of the detection and fuzzing
scores that ``lit-sae explain`` measured (lit_sae.autointerp; definitions in docs/autointerp.md), and its Markdown.

The per-latent score summarised is the **accuracy** on the balanced held-out samples (delphi reports accuracy, F1,
precision and recall per latent; with as many positives as negatives accuracy is close to balanced accuracy and
chance is 0.5). F1 is summarised beside it.
"""

from __future__ import annotations

import statistics

__all__ = ["summarize_scores", "render_autointerp_section"]

GOOD = 0.8  # the threshold the issue and the report quote ("fraction >= 0.8")


def _dist(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "median": None, "p10": None, "p90": None, f"frac_ge_{GOOD}": None}
    v = sorted(values)

    def q(f: float) -> float:  # nearest-rank quantile
        return v[min(len(v) - 1, int(f * (len(v) - 1) + 0.5))]

    return {"n": len(v), "mean": statistics.fmean(v), "median": statistics.median(v), "p10": q(0.1), "p90": q(0.9),
            f"frac_ge_{GOOD}": sum(x >= GOOD for x in v) / len(v),
            "histogram": {"edges": [i / 10 for i in range(11)],
                          "counts": [sum(min(int(x * 10), 9) == b for x in v) for b in range(10)]}}


def summarize_scores(results: dict[int, dict], backend: dict) -> dict:
    """The section from ``explain_and_score``'s per-latent results and the backend's identity (kind, model, URL)."""
    rs = list(results.values())
    out = {"backend": backend, "n_latents": len(rs)}
    for st in ("ok", "dead", "too rare", "no held-out activations", "unscored"):
        out[f"n_{st.replace(' ', '_').replace('-', '_')}"] = sum(r["status"] == st for r in rs)
    out["n_explanations_unparsed"] = sum(r.get("explanation_parsed") is False for r in rs)
    for name in ("detection", "fuzz"):
        scored = [r[name] for r in rs if r.get(name) and r[name].get("accuracy") is not None]
        out[name] = {"accuracy": _dist([s["accuracy"] for s in scored]),
                     "f1": _dist([s["f1"] for s in scored if s.get("f1") is not None]),
                     "auroc": _dist([s["auroc"] for s in scored if s.get("auroc") is not None]),
                     "samples_per_latent": statistics.fmean([s["n"] for s in scored]) if scored else None,
                     "unparsed_samples": sum(s["n_unparsed"] for s in scored)}
    return out


def render_autointerp_section(s: dict) -> list[str]:
    """Markdown lines for report.md."""
    def f(x):
        return "-" if x is None else f"{x:.3g}"

    b = s.get("backend", {})
    lines = ["## Autointerp (LLM explanations scored by detection and fuzzing; delphi, Paulo et al. 2024)", "",
             f"Explainer and judge: {b.get('kind')} `{b.get('model')}`" + (f" at {b['base_url']}" if b.get("base_url")
                                                                           else "") + ".", ""]
    t = s.get("text")
    if t:
        lines += [f"Text: {t.get('split')} split, {t.get('n_contexts')} contexts ({t.get('n_tokens')} tokens); the "
                  "explainer saw even contexts, the scores come from odd (held-out) ones.", ""]
    lines += ["| score (per-latent accuracy, chance 0.5) | latents | mean | median | p10 | p90 | "
              f"fraction >= {GOOD} | samples per latent |", "|---|---|---|---|---|---|---|---|"]
    for name in ("detection", "fuzz"):
        d = s[name]["accuracy"]
        lines.append(f"| {name} | {d['n']} | {f(d['mean'])} | {f(d['median'])} | {f(d['p10'])} | {f(d['p90'])} | "
                     f"{f(d.get(f'frac_ge_{GOOD}'))} | {f(s[name]['samples_per_latent'])} |")
    lines += ["", f"Latents: {s['n_latents']} chosen ({s.get('selection', '')}); scored {s.get('n_ok', 0)}, dead "
              f"{s.get('n_dead', 0)}, too rare to explain {s.get('n_too_rare', 0)}, no held-out activations "
              f"{s.get('n_no_held_out_activations', 0)}; explanations without the [EXPLANATION] tag: "
              f"{s.get('n_explanations_unparsed', 0)}; unparsed judge answers: detection "
              f"{s['detection']['unparsed_samples']}, fuzzing {s['fuzz']['unparsed_samples']} samples.", ""]
    ref = s.get("reference")
    if ref:
        rb = ref.get("backend", {})
        lines += [f"Reference backend {rb.get('kind')} `{rb.get('model')}` on {ref.get('n_latents')} of the same "
                  "latents:", "", "| score | latents | Pearson r | Spearman rho | pairwise agreement | "
                  "sample agreement |", "|---|---|---|---|---|---|"]
        for name in ("detection", "fuzz"):
            a = ref.get(name, {})
            lines.append(f"| {name} | {a.get('n')} | {f(a.get('pearson'))} | {f(a.get('spearman'))} | "
                         f"{f(a.get('pairwise_agreement'))} | {f(a.get('sample_agreement'))} |")
        lines.append("")
    return lines
