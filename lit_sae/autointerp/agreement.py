"""How far two backends agree on the same latents: can a cheap local model be trusted for this SAE?

For each scorer (detection, fuzzing), over the latents both backends scored:

- ``pearson`` and ``spearman``: correlation of the per-latent accuracies (torchmetrics; None with fewer than 3
  latents or a constant score);
- ``pairwise_agreement``: over pairs of latents whose accuracies differ under both backends, the fraction the two
  backends order the same way (Kendall's concordance; 1: same ranking, 0.5: unrelated);
- ``sample_agreement``: over held-out samples both judges answered (the same contexts, each judged against its own
  backend's explanation), the fraction of equal answers.
"""

from __future__ import annotations

__all__ = ["agreement"]


def _corr(x: list[float], y: list[float], kind: str) -> float | None:
    """torchmetrics' Pearson or Spearman correlation; None with fewer than 3 points or a constant score."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    import torch
    from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef

    fn = pearson_corrcoef if kind == "pearson" else spearman_corrcoef
    return float(fn(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))


def agreement(first: dict[int, dict], second: dict[int, dict]) -> dict:
    """The agreement of two ``explain_and_score`` results (see the module docstring), per scorer."""
    out = {"n_latents": len(set(first) & set(second))}
    for name in ("detection", "fuzz"):
        both = [i for i in sorted(set(first) & set(second))
                if (first[i].get(name) or {}).get("accuracy") is not None
                and (second[i].get(name) or {}).get("accuracy") is not None]
        x = [first[i][name]["accuracy"] for i in both]
        y = [second[i][name]["accuracy"] for i in both]
        same = total = 0
        for a in range(len(both)):
            for b in range(a + 1, len(both)):
                dx, dy = x[a] - x[b], y[a] - y[b]
                if dx != 0 and dy != 0:
                    total += 1
                    same += (dx > 0) == (dy > 0)
        eq = n = 0
        for i in both:
            s1 = {(s["ctx"], s["start"], s["positive"], tuple(s["marked"] or ())): s["prediction"]
                  for s in first[i]["samples"].get(name, [])}
            for s in second[i]["samples"].get(name, []):
                k = (s["ctx"], s["start"], s["positive"], tuple(s["marked"] or ()))
                if s["prediction"] is not None and s1.get(k) is not None:
                    n += 1
                    eq += s1[k] == s["prediction"]
        out[name] = {"n": len(both), "pearson": _corr(x, y, "pearson"), "spearman": _corr(x, y, "spearman"),
                     "pairwise_agreement": same / total if total else None, "n_pairs": total,
                     "sample_agreement": eq / n if n else None, "n_samples": n}
    return out
