"""``lit-sae reproduce``: the claims of Gao et al. (2024) measured on any harvest, with figures and a verdict each.

One job per file: ``grid`` (which SAEs each claim needs, the quick and full settings), ``train`` (all SAEs in one
sweep over the activation stream), ``measure`` (test-split NMSE / L0 / dead latents, Multi-TopK at larger k, downstream
delta CE, probes, ablation sparsity), ``claims`` (fits and verdicts), ``figures`` (PNGs), ``run`` (the command).
"""
