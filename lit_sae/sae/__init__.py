"""The SAE itself, a plain ``torch.nn.Module`` that knows nothing of Lightning, files of a run, or distribution.

- ``config``: ``SAEConfig``, every setting of the SAE with its meaning (the other lists of settings derive from it).
- ``model``: ``TopKSAE`` (TopK, BatchTopK, Matryoshka, ReLU + L1, JumpReLU codes; AuxK; Multi-TopK) and ``SAEOutput``.
- ``activations``: the code functions other than TopK; ``kernels``: the sparse encoder and the dense references,
  the public entry of the fast path (``decode_kernels``: the sparse decoder; ``scatter``: the gather/scatter
  products of both backward passes; ``workspace``: the buffers kept between calls); ``selection``: exact top-k with
  lit-sae's tie order; ``losses``; ``median`` (b_pre's geometric median); ``checks`` (input shape/dtype checks);
  ``ema``; ``io`` (the SAE's own save/load in SAELens's layout).
"""

from lit_sae.sae.model import ENCODER_INIT_NORM, LAYERNORM_EPS, THRESHOLD_CODES, TopKSAE
from lit_sae.sae.output import SAEOutput

__all__ = ["ENCODER_INIT_NORM", "LAYERNORM_EPS", "SAEOutput", "THRESHOLD_CODES", "TopKSAE"]
