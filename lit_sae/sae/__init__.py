"""The SAE itself, a plain ``torch.nn.Module`` that knows nothing of Lightning, files of a run, or distribution.

- ``model``: ``TopKSAE`` (TopK, BatchTopK, Matryoshka, ReLU + L1, JumpReLU codes; AuxK; Multi-TopK) and ``SAEOutput``.
- ``activations``: the code functions other than TopK; ``kernels``: the sparse encode/decode autograd functions;
  ``selection``: exact top-k with lit-sae's tie order; ``losses``; ``median`` (b_pre's geometric median);
  ``checks`` (input shape/dtype checks); ``ema``; ``io`` (the SAE's own save/load in SAELens's layout).
"""

from lit_sae.sae.model import ENCODER_INIT_NORM, LAYERNORM_EPS, THRESHOLD_CODES, SAEOutput, TopKSAE

__all__ = ["ENCODER_INIT_NORM", "LAYERNORM_EPS", "SAEOutput", "THRESHOLD_CODES", "TopKSAE"]
