"""The reproduction's PNG figures (matplotlib, Agg backend: no display needed). One function per claim; each writes
``<folder>/<name>.png`` through a temporary file and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lit_sae.fsync import atomic_write

__all__ = ["FIGURES", "write_figures"]

FIGURES = ("frontier", "dead_latents", "size_law", "multi_topk", "delta_ce_vs_nmse", "ablation_sparsity")
ARCH_STYLE = {"topk": "o-", "batchtopk": "s-", "relu": "^-", "jumprelu": "v-"}


def _save(fig, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, dpi=110, bbox_inches="tight", format="png")
    return path


def write_figures(r: dict[str, Any], folder: Path) -> dict[str, str]:
    """Draw every figure of ``FIGURES`` from the results ``r``; returns name -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    s, g = r["saes"], r["groups"]
    out = {}

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arch, style in ARCH_STYLE.items():
        pts = sorted((s[n]["l0"], s[n]["nmse"]) for n in g["frontier_" + arch])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=arch)
    ax.set(xscale="log", yscale="log", xlabel="L0 (test)", ylabel="normalized MSE (test)",
           title=f"NMSE-L0 frontier, n_latents={r['setting']['frontier_n_latents']}")
    ax.legend()
    out["frontier"] = _save(fig, folder, "frontier")

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    names = g["dead"]
    ax.bar([n.removeprefix("dead-") for n in names], [100 * s[n]["dead_fraction"] for n in names])
    ax.set(ylabel="dead latents (%)", title=f"TopK k={r['setting']['k_ref']}, n={r['setting']['dead_n_latents']}")
    out["dead_latents"] = _save(fig, folder, "dead_latents")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ns = [s[n]["n_latents"] for n in g["sizes"]]
    axes[0].plot(ns, [s[n]["nmse"] for n in g["sizes"]], "o", label="measured")
    fit = r.get("size_fit")
    if fit:
        axes[0].plot(ns, [fit["a"] * n ** fit["exponent"] for n in ns], "-",
                     label=f"fit: exponent {fit['exponent']:.3f}")
    axes[0].set(xscale="log", yscale="log", xlabel="n_latents", ylabel="normalized MSE",
                title=f"size law at k={r['setting']['k_ref']}")
    axes[0].legend()
    probe = [s[n].get("probe_ce") for n in g["sizes"]]
    if all(p is not None for p in probe):
        axes[1].plot(ns, probe, "o-", label="best SAE latent")
        axes[1].axhline(s[g["sizes"][0]]["probe_raw_ce"], color="gray", ls="--", label="best raw dimension")
        axes[1].legend()
    axes[1].set(xscale="log", xlabel="n_latents", ylabel="mean probe CE (held out)", title="1-d probes")
    dce = [s[n].get("delta_ce") for n in g["sizes"]]
    if all(d is not None for d in dce):
        axes[2].plot(ns, dce, "o-")
    axes[2].set(xscale="log", xlabel="n_latents", ylabel="delta CE (nats)", title="downstream loss")
    out["size_law"] = _save(fig, folder, "size_law")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, label in zip(g["multi"], ("TopK", "Multi-TopK")):
        ks = sorted(r["multi_topk"][name], key=int)
        ax.plot([int(k) for k in ks], [r["multi_topk"][name][k] for k in ks], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="k' at test", ylabel="normalized MSE (test)",
           title=f"trained at k={r['setting']['k_ref']}")
    ax.legend()
    out["multi_topk"] = _save(fig, folder, "multi_topk")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arch, style in ARCH_STYLE.items():
        pts = sorted((s[n]["nmse"], s[n]["delta_ce"]) for n in g["frontier_" + arch] if s[n].get("delta_ce"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=arch)
    pts = sorted((s[n]["nmse"], s[n]["delta_ce"]) for n in g["sizes"] if s[n].get("delta_ce"))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "x--", label="topk sizes")
    ax.set(xscale="log", yscale="log", xlabel="normalized MSE (test)", ylabel="delta CE (nats)",
           title="downstream loss vs MSE")
    ax.legend()
    out["delta_ce_vs_nmse"] = _save(fig, folder, "delta_ce_vs_nmse")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    rows = [(s[n]["k"], s[n]["ablation"]) for n in g["ablation"] if "ablation" in s[n]]
    for key, label in (("mean", "SAE latents"), ("basis_mean", "residual basis directions"),
                       ("random_mean", "random directions")):
        ax.plot([k for k, _ in rows], [a[key] for _, a in rows], "o-", label=label)
    ax.set(xscale="log", xlabel="k", ylabel="(L1/L2)^2 / (V T)  (lower: sparser)", title="ablation sparsity")
    ax.legend()
    out["ablation_sparsity"] = _save(fig, folder, "ablation_sparsity")
    plt.close("all")
    return {k: str(v) for k, v in out.items()}
