"""Fits and verdicts: each claim of Gao et al. (2024) against what was measured, as a row of the table.

A verdict is ``yes`` (the measured numbers show the claim), ``no`` (they show the opposite or nothing), ``partly``
(some but not all parts hold) or ``n/a`` (this run cannot test it, with the reason). Thresholds are stated in each row.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["power_law", "loglog_slope", "frontier_gap", "judge_all"]


def power_law(n: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares fit of log y = log a + b log n: {"a", "exponent" (b), "exponent_se" (its standard error),
    "rms_log_residual", "r2"}. Needs >= 3 points with y > 0."""
    x, t = np.log(np.asarray(n, float)), np.log(np.asarray(y, float))
    A = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(A, t, rcond=None)
    resid = t - A @ coef
    dof = max(len(x) - 2, 1)
    s2 = float(resid @ resid) / dof
    cov = s2 * np.linalg.inv(A.T @ A)
    ss = float(((t - t.mean()) ** 2).sum())
    return {"a": float(math.exp(coef[0])), "exponent": float(coef[1]), "exponent_se": float(math.sqrt(cov[1, 1])),
            "rms_log_residual": float(math.sqrt(float(resid @ resid) / len(x))),
            "r2": 1.0 - float(resid @ resid) / ss if ss > 0 else math.nan}


def loglog_slope(x: list[float], y: list[float]) -> float:
    """Slope of log y against log x (nan with fewer than 2 positive points)."""
    pts = [(a, b) for a, b in zip(x, y) if a > 0 and b > 0]
    if len(pts) < 2:
        return math.nan
    return power_law([p[0] for p in pts], [p[1] for p in pts])["exponent"] if len(pts) > 2 else float(
        (math.log(pts[1][1]) - math.log(pts[0][1])) / (math.log(pts[1][0]) - math.log(pts[0][0])))


def frontier_gap(ref: list[tuple[float, float]], other: list[tuple[float, float]]) -> dict[str, Any]:
    """How much higher ``other``'s NMSE is than ``ref``'s at the same L0: the mean of log(NMSE_other / NMSE_ref)
    over other's points inside ref's L0 range (ref interpolated linearly in log-log). Points are (L0, NMSE).
    Returns {"mean_log_ratio", "ratio" (exp of it), "n_matched"}; nan when no L0 overlaps."""
    ref = sorted(p for p in ref if p[0] > 0 and p[1] > 0)
    lx, ly = np.log([p[0] for p in ref]), np.log([p[1] for p in ref])
    logs = [math.log(b) - float(np.interp(math.log(a), lx, ly)) for a, b in other
            if a > 0 and b > 0 and lx[0] <= math.log(a) <= lx[-1]]
    m = float(np.mean(logs)) if logs else math.nan
    return {"mean_log_ratio": m, "ratio": math.exp(m) if logs else math.nan, "n_matched": len(logs)}


def _row(claim: str, paper: str, measured: str, verdict: str) -> dict[str, str]:
    return {"claim": claim, "paper": paper, "measured": measured, "verdict": verdict}


def judge_all(r: dict[str, Any]) -> list[dict[str, str]]:
    """The table's rows from the measured results ``r`` (see ``lit_sae.reproduce.run``)."""
    return [_frontier(r), _dead(r), _sizes(r), _probes(r), _multi(r), _delta_vs_nmse(r), _ablation(r)]


def _pts(r, names):
    return [(r["saes"][n]["l0"], r["saes"][n]["nmse"]) for n in names]


def _frontier(r):
    g = r["groups"]
    top = _pts(r, g["frontier_topk"])
    parts, verdict = [], "n/a (no ReLU point inside TopK's L0 range: widen relu_coefs)"
    gaps = {}
    for arch in ("relu", "jumprelu", "batchtopk"):
        gap = frontier_gap(top, _pts(r, g["frontier_" + arch]))
        gaps[arch] = gap
        l0s = [p[0] for p in _pts(r, g["frontier_" + arch])]
        parts.append(f"{arch}: NMSE x{gap['ratio']:.3f} of TopK's at matched L0 ({gap['n_matched']} points; its L0 "
                     f"{min(l0s):.1f}-{max(l0s):.1f})")
    r["frontier_gaps"] = gaps
    relu = gaps["relu"]
    if relu["n_matched"]:
        verdict = "yes" if relu["ratio"] > 1.0 else "no"
    return _row("1. NMSE-L0 frontier", "TopK reaches lower NMSE than ReLU + L1 at every L0 (better frontier); "
                "JumpReLU / BatchTopK are compared here too (no claim in the paper)",
                "; ".join(parts) + " (x > 1: worse than TopK)", verdict)


def _dead(r):
    d = {n.removeprefix("dead-"): r["saes"][n]["dead_fraction"] for n in r["groups"]["dead"]}
    measured = ", ".join(f"{k}: {v:.1%}" for k, v in d.items())
    best, worst = d["tied-auxk"], d["random-noauxk"]
    if max(d.values()) < 0.01:
        verdict = "n/a (under 1% dead in every arm: this run is too short / small for latents to die)"
    elif best <= min(d.values()) and worst > best:
        verdict = "yes"
    else:
        verdict = "partly" if best < worst else "no"
    return _row("2. Dead latents", "tied init + AuxK keep dead latents near zero; without them many die",
                measured + f" (dead: not fired in the last {r['setting']['dead_after_tokens']} training tokens)",
                verdict)


def _sizes(r):
    g = r["groups"]["sizes"]
    n = [r["saes"][x]["n_latents"] for x in g]
    fit = power_law(n, [r["saes"][x]["nmse"] for x in g])
    r["size_fit"] = fit
    ok = fit["exponent"] < 0 and fit["r2"] > 0.9
    measured = (f"NMSE = {fit['a']:.3g} n^({fit['exponent']:.3f} +/- {fit['exponent_se']:.3f}), R^2 {fit['r2']:.3f}, "
                f"rms log residual {fit['rms_log_residual']:.3f} over n = {min(n)}-{max(n)}")
    return _row("3a. NMSE vs n_latents", "at fixed k, NMSE falls as a power law in n (exponent about -0.2 at k = 32 "
                "for GPT-2 small, fit to converged runs)", measured, "yes" if ok else "no")


def _probes(r):
    g = r["groups"]["sizes"]
    rows = [(r["saes"][x]["n_latents"], r["saes"][x].get("probe_ce"), r["saes"][x].get("probe_raw_ce"),
             r["saes"][x].get("delta_ce")) for x in g]
    if any(p is None or math.isnan(p) for _, p, _, _ in rows):
        return _row("3b. Probe loss and delta CE vs n_latents", "probe loss improves with n", "probes not run", "n/a")
    ns = [a for a, *_ in rows]
    probe_slope = loglog_slope(ns, [p for _, p, _, _ in rows])
    dce_slope = loglog_slope(ns, [d for *_, d in rows])
    raw = rows[0][2]
    turn = next((a for a, p, rw, _ in rows if p < rw), None)
    measured = (f"probe CE {', '.join(f'n={a}: {p:.3f}' for a, p, _, _ in rows)} vs best raw dimension {raw:.3f} "
                f"(log-log slope {probe_slope:+.3f}); SAE latent beats raw "
                + (f"from n = {turn}" if turn else "at no size tried")
                + f"; delta CE slope vs n {dce_slope:+.3f}")
    verdict = "yes" if probe_slope < 0 and dce_slope < 0 else ("partly" if probe_slope < 0 or dce_slope < 0 else "no")
    return _row("3b. Probe loss and delta CE vs n_latents", "probe loss and downstream loss improve with n", measured,
                verdict)


def _multi(r):
    plain, multi = r["groups"]["multi"]
    m = r["multi_topk"]
    ks = sorted(m[plain], key=int)
    measured = "; ".join(f"k'={k}: TopK {m[plain][k]:.4f}, Multi-TopK {m[multi][k]:.4f}" for k in ks)
    k2, k4 = ks[1], ks[2]
    better = m[multi][k2] < m[plain][k2] and m[multi][k4] < m[plain][k4]
    monotone = m[multi][k4] <= m[multi][k2] <= m[multi][ks[0]]
    verdict = "yes" if better and monotone else ("partly" if better or monotone else "no")
    return _row("4. Multi-TopK", "an SAE trained with Multi-TopK can be used at larger k' (NMSE keeps falling as k' "
                "grows); plain TopK degrades past its training k", measured + " (NMSE on the test split)", verdict)


def _delta_vs_nmse(r):
    top = [n for n in r["groups"]["frontier_topk"] + r["groups"]["sizes"] if r["saes"][n].get("delta_ce") is not None]
    top = list(dict.fromkeys(top))
    pts = [(r["saes"][n]["nmse"], r["saes"][n]["delta_ce"]) for n in top if r["saes"][n]["delta_ce"] > 0]
    if len(pts) < 3:
        return _row("5. Delta CE vs NMSE", "downstream loss improves more than MSE", "fewer than 3 TopK SAEs with a "
                    "positive delta CE", "n/a")
    fit = power_law([p[0] for p in pts], [p[1] for p in pts])
    r["delta_ce_fit"] = fit
    per_arch = {}
    for arch in ("topk", "batchtopk", "relu", "jumprelu"):
        ps = [(r["saes"][n]["nmse"], r["saes"][n]["delta_ce"]) for n in r["groups"]["frontier_" + arch]
              if r["saes"][n].get("delta_ce", 0) and r["saes"][n]["delta_ce"] > 0]
        per_arch[arch] = loglog_slope([p[0] for p in ps], [p[1] for p in ps])
    measured = (f"TopK: delta CE ~ NMSE^{fit['exponent']:.2f} +/- {fit['exponent_se']:.2f} (R^2 {fit['r2']:.2f}, "
                f"{len(pts)} SAEs); slopes on the frontier: "
                + ", ".join(f"{a} {s:.2f}" for a, s in per_arch.items() if not math.isnan(s)))
    return _row("5. Delta CE vs NMSE", "downstream loss improves more than MSE does (slope of log delta CE on log NMSE "
                "> 1 for TopK)", measured, "yes" if fit["exponent"] > 1 else "no")


def _ablation(r):
    names = [n for n in r["groups"]["ablation"] if "ablation" in r["saes"][n]]
    if not names:
        return _row("6. Ablation sparsity", "latent ablations sparser than basis directions", "not run", "n/a")
    ab = [(r["saes"][n]["k"], r["saes"][n]["ablation"]) for n in names]
    measured = "; ".join(f"k={k}: latents {a['mean']:.3f} vs basis {a['basis_mean']:.3f} "
                         f"(random {a['random_mean']:.3f})" for k, a in ab)
    sparser = [a["mean"] < a["basis_mean"] for _, a in ab]
    trend = loglog_slope([k for k, _ in ab], [a["mean"] for _, a in ab])
    verdict = ("yes" if all(sparser) and trend > 0 else "partly" if any(sparser) else "no")
    return _row("6. Ablation sparsity vs k", "ablating a latent moves fewer logits than ablating a residual-stream "
                "basis direction ((L1/L2)^2 / (V T) lower), less so at large k",
                measured + f"; log-log slope in k {trend:+.3f}", verdict)
