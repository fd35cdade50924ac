"""Which SAEs the six claims need, and the two settings (``quick``, ``full``) that size them.

Every SAE is one entry of a single sweep (``SAESweepModule``): all of them read the same batches once.
An SAE that serves two claims (TopK at the reference size and k serves the frontier, the size law, Multi-TopK's
baseline and the dead-latent study's "tied + AuxK" cell when sizes agree) is trained once.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Setting:
    """Sizes of a reproduction. Token counts are per SAE (every SAE sees every batch)."""

    name: str
    epochs: float
    """Passes over the harvest's train split (the stream repeats; reshuffled each pass)."""
    batch_size_tokens: int
    frontier_n_latents: int
    """Dictionary size of the NMSE-L0 frontier (claim 1) and of the ablation study (claim 6)."""
    frontier_ks: tuple[int, ...]
    """k of TopK and BatchTopK on the frontier (L0 = k)."""
    relu_coefs: tuple[float, ...]
    """ReLU + L1: weights of the normalised L1 (||z||_1 / ||x||_2), swept to cover the ks' L0 range."""
    jumprelu_coefs: tuple[float, ...]
    """JumpReLU: weights of the L0 penalty."""
    sizes: tuple[int, ...]
    """n_latents of the size law (claim 3), at k = ``k_ref``."""
    k_ref: int
    dead_n_latents: int
    """Dictionary size of the dead-latent study (claim 2), at k = ``k_ref``."""
    dead_after_tokens: int
    """A latent that has not fired for this many training tokens is dead (the paper: 10M, for billion-token runs)."""
    sparsity_warmup_fraction: float = 0.05
    """ReLU / JumpReLU penalty warm-up, as a fraction of the training steps (SAELens's l1_warm_up_steps)."""
    eval_contexts: int = 32
    """Held-out contexts for delta CE."""
    probe_contexts: int = 128
    ablation_latents: int = 32
    ablation_contexts_per_latent: int = 2
    init_tokens: int = 16384
    max_train_tokens: Optional[int] = None
    """Cap on the tokens each SAE trains on (None: ``epochs`` passes whatever the harvest's size)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = Setting(name="quick", epochs=2.0, batch_size_tokens=1024, frontier_n_latents=256, frontier_ks=(8, 16, 32, 64),
                relu_coefs=(0.03, 0.3, 3.0), jumprelu_coefs=(1e-3, 3e-3, 1e-2), sizes=(64, 128, 256, 512, 1024),
                k_ref=16, dead_n_latents=512, dead_after_tokens=4096, eval_contexts=4, probe_contexts=24,
                ablation_latents=4, ablation_contexts_per_latent=1, init_tokens=2048, max_train_tokens=65536)
# The full setting on the embedded default (d_in 576, ~135k train tokens): see docs/reproduce.md for its cost.
FULL = Setting(name="full", epochs=2.0, batch_size_tokens=1024, frontier_n_latents=512,
               frontier_ks=(8, 16, 32, 64, 128), relu_coefs=(0.03, 0.1, 0.3, 1.0, 3.0),
               jumprelu_coefs=(5e-4, 1e-3, 3e-3, 1e-2, 3e-2), sizes=(256, 512, 1024, 2048, 4096), k_ref=32,
               dead_n_latents=1024, dead_after_tokens=32768, eval_contexts=24, probe_contexts=96,
               ablation_latents=24)
SETTINGS = {"quick": QUICK, "full": FULL}


def sae_specs(s: Setting, steps: int) -> tuple[list[dict[str, Any]], dict[str, list[str]], set[str]]:
    """(sweep entries, claim -> SAE names, names whose encoder starts random instead of tied).

    ``steps``: training steps (for the penalty warm-up). Names: ``<arch>-<knob><value>-n<n_latents>`` and the
    dead-latent study's ``dead-<init>-<auxk>``."""
    specs: dict[str, dict[str, Any]] = {}
    warmup = max(1, int(s.sparsity_warmup_fraction * steps))
    n = s.frontier_n_latents

    def add(name: str, **kw) -> str:
        name = re.sub(r"[^A-Za-z0-9_\-]", "_", name)  # as the sweep names its SAEs
        specs.setdefault(name, {"name": name, **kw})
        return name

    frontier = {"topk": [add(f"topk-k{k}-n{n}", activation="topk", k=k, n_latents=n) for k in s.frontier_ks],
                "batchtopk": [add(f"batchtopk-k{k}-n{n}", activation="batchtopk", k=k, n_latents=n)
                              for k in s.frontier_ks],
                "relu": [add(f"relu-l1{c:g}-n{n}", activation="relu", k=1, n_latents=n, sparsity_coef=c,
                             sparsity_warmup_steps=warmup) for c in s.relu_coefs],
                "jumprelu": [add(f"jumprelu-l0{c:g}-n{n}", activation="jumprelu", k=1, n_latents=n, sparsity_coef=c,
                                 sparsity_warmup_steps=warmup, normalize="scalar") for c in s.jumprelu_coefs]}
    sizes = [add(f"topk-k{s.k_ref}-n{m}", activation="topk", k=s.k_ref, n_latents=m) for m in s.sizes]
    dead, random_init = [], set()
    for init in ("tied", "random"):
        for auxk in ("auxk", "noauxk"):
            name = add(f"dead-{init}-{auxk}", activation="topk", k=s.k_ref, n_latents=s.dead_n_latents,
                       auxk_coef=1 / 32 if auxk == "auxk" else 0.0)
            dead.append(name)
            if init == "random":
                random_init.add(name)
    multi_n = max(n, 4 * s.k_ref)
    multi = [add(f"topk-k{s.k_ref}-n{multi_n}", activation="topk", k=s.k_ref, n_latents=multi_n),
             add(f"multitopk-k{s.k_ref}-n{multi_n}", activation="topk", k=s.k_ref, n_latents=multi_n,
                 multi_topk=True)]
    groups = {"frontier_" + arch: names for arch, names in frontier.items()}
    groups.update(sizes=sizes, dead=dead, multi=multi, ablation=frontier["topk"])
    return list(specs.values()), groups, random_init
