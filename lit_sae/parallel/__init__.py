"""Scale-out pieces: data-parallel loss statistics (``data``) and one SAE sharded over its latents (``tensor``).

The SAE (``lit_sae.sae``), its kernels and losses know nothing of distribution; they meet it only through
``TopKSAE.batch_sum`` (a :class:`lit_sae.losses.BatchSum`). Everything that talks to ``torch.distributed`` lives here.
"""
