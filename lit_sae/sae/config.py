"""``SAEConfig``: every setting of a ``TopKSAE``, in one place, each with its meaning.

The lists other parts of lit-sae keep are derived from its fields, so a new SAE setting is added here (and to
``TopKSAE.__init__``, which computes with it), not in five places:

- ``REBUILD_KEYS``: what ``TopKSAE.config()`` returns and an export's ``cfg.json`` records (``TopKSAE(**config)``
  rebuilds the SAE's shapes and computation);
- ``MODULE_KEYS``: ``SAEModule``'s SAE arguments, the flat ``model.<key>`` of a recipe (``SAEModule.__init__``
  names them explicitly, for LightningCLI and ``lit_sae.cli.check``; ``tests/sae/test_config.py`` keeps the two
  equal, defaults included); the per-SAE keys of a sweep (``lit_sae.train.sweep_specs.SAE_KEYS``) and the arguments
  ``lit_sae.artifacts.load`` rebuilds a checkpoint's SAE from are these;
- ``RESUME_KEYS``: settings a checkpoint's weights and state are tied to (a resume with another value is refused,
  ``lit_sae.train.resume_checks.RESUME_MUST_MATCH``);
- ``SHARDED_KEYS``: the settings a latent-sharded SAE takes (``lit_sae.parallel.tensor.ShardedTopKSAE``) and a
  sharded checkpoint records (``lit_sae.artifacts.sharded.CONFIG_KEYS``).

Defaults are ``SAEModule``'s: ``None`` for an architecture setting means the activation's own default
(``lit_sae.sae.activations``), which :meth:`SAEConfig.sae_kwargs` leaves to ``TopKSAE``. Like sparsify's
``SparseCoderConfig`` (``sparsify/config.py``): a dataclass with a docstring under every field.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, Optional

__all__ = ["ENCODER_INIT_NORM", "MODULE_KEYS", "REBUILD_KEYS", "RESUME_KEYS", "SHARDED_KEYS", "SAEConfig", "defaults"]

# W_enc starts as W_dec^T scaled to this row norm. The paper's tied init is 1.0; on the embedded default
# (n=4096, k=32, 400k tokens) val NMSE was 0.363 at 1.0, 0.331 at 0.7, 0.329 at 0.5, 0.335 at 0.3, so 0.5.
ENCODER_INIT_NORM = 0.5


def _setting(default: Any = MISSING, *, module: bool = True, rebuild: bool = True, resume: bool = False,
             sharded: bool = False):
    """A field and the lists it belongs to (see the module docstring)."""
    return field(default=default, metadata={"module": module, "rebuild": rebuild, "resume": resume, "sharded": sharded})


@dataclass(frozen=True)
class SAEConfig:
    """The settings of one TopK SAE (Gao et al., 2024) and of its baselines; see the module docstring."""

    d_in: int = _setting(resume=True, sharded=True)
    """Width of the activations (the LM's hidden size at the hook point). In a recipe it comes from the data's
    manifest (``model.d_in`` is linked to ``data.d_in``)."""
    n_latents: int = _setting(16384, resume=True, sharded=True)
    """Number of latents (the dictionary size, SAELens's ``d_sae``)."""
    k: int = _setting(32, resume=True, sharded=True)
    """Latents kept per token (TopK); for ``batchtopk`` / ``matryoshka_batchtopk`` the mean per token of a batch."""
    k_aux: Optional[int] = _setting(None, resume=True, sharded=True)
    """Dead latents the AuxK loss reconstructs the residual with (section 2.4); None: d_in // 2 (the paper), capped
    at n_latents."""
    auxk_coef: float = _setting(1 / 32, sharded=True)
    """Weight of the AuxK loss in the training objective (the paper: 1/32)."""
    multi_topk: bool = _setting(False, resume=True, sharded=True)
    """Add the Multi-TopK loss (section 5.3): also reconstruct from the top ``k * multi_topk_factor`` latents."""
    multi_topk_factor: int = _setting(4, module=False, sharded=True)
    """Multi-TopK's larger k as a multiple of k (the paper: 4). Not a ``model.*`` key: the SAE API's only."""
    activation: str = _setting("topk", resume=True, sharded=True)
    """``topk``, ``batchtopk``, ``matryoshka_batchtopk`` (alias ``matryoshka``), ``relu`` (+ L1) or ``jumprelu``
    (``lit_sae.sae.activations``); a sharded SAE is ``topk`` only."""
    normalize: Literal["none", "scalar", "layernorm"] = _setting("none", resume=True, sharded=True)
    """Input normalisation: ``none``; ``scalar`` (one scale so that E||x||^2 = d_in, estimated from data);
    ``layernorm`` (per token, as OpenAI's released SAEs)."""
    threshold_momentum: float = _setting(0.99, module=False, sharded=True)
    """``batchtopk``: momentum of the running threshold used at inference. Not a ``model.*`` key."""
    sparsity_coef: Optional[float] = _setting(None)
    """``relu``: weight of the normalised L1 ``||z||_1 / ||x||_2``; ``jumprelu``: weight of the L0 (required for
    both, >= 0; not allowed for the others, which leave it None)."""
    sparsity_warmup_steps: Optional[int] = _setting(None)
    """``relu`` / ``jumprelu``: the penalty ramps linearly from 0 over this many steps; None: 0 (no warm-up)."""
    jumprelu_bandwidth: Optional[float] = _setting(None)
    """``jumprelu``: the straight-through estimator's kernel width (Rajamanoharan et al. 2024); None: 0.001."""
    jumprelu_init_threshold: Optional[float] = _setting(None)
    """``jumprelu``: every latent's initial threshold; None: 0.001 (Gemma Scope's; assumes ``normalize: scalar``)."""
    matryoshka_prefixes: Optional[list[int]] = _setting(None)
    """``matryoshka_batchtopk``: increasing prefix sizes, each of which reconstructs the input (n_latents is added
    as the last; required)."""
    encoder_init_norm: float = _setting(ENCODER_INIT_NORM, rebuild=False)
    """Row norm of W_enc at init (W_enc = W_dec^T scaled); not part of the trained SAE's config."""
    fast: bool = _setting(True, rebuild=False)
    """Use the sparse kernels (``lit_sae.sae.kernels``); False: the dense reference path (tests, benchmarks).
    Not part of the trained SAE's config: both paths compute the same SAE."""

    def sae_kwargs(self) -> dict[str, Any]:
        """``TopKSAE``'s keyword arguments for these settings (``TopKSAE(**config.sae_kwargs())``); a None is left to
        ``TopKSAE``'s default (the activation's own)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def _keys(flag: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(SAEConfig) if f.metadata[flag])


REBUILD_KEYS = _keys("rebuild")
MODULE_KEYS = _keys("module")
RESUME_KEYS = _keys("resume")
SHARDED_KEYS = _keys("sharded")


def defaults(keys: tuple[str, ...]) -> dict[str, Any]:
    """{key: SAEConfig's default} for ``keys`` (a field without a default, ``d_in``, is left out)."""
    return {f.name: f.default for f in fields(SAEConfig) if f.name in keys and f.default is not MISSING}
