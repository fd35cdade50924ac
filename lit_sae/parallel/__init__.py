"""Scale-out pieces; everything that talks to ``torch.distributed`` lives here.

- ``data``: data parallelism: the losses' batch statistics summed over the data-parallel ranks (``GroupSum``).
- ``collectives``: the autograd-aware all-reduce pair a latent-sharded SAE needs.
- ``tensor``: ``ShardedTopKSAE``, one SAE split over its latents (exact sharded TopK, AuxK, Multi-TopK, decode).
- ``checkpoint``: sharded checkpoints with ``torch.distributed.checkpoint``; gather and export to one SAE.
- ``memory``: per-device memory of a training step for a (data x tensor) layout.
- ``module``: what ``SAEModule.configure_model`` does under a device mesh (shard the SAE, its EMA and counters).
- ``strategy``: ``SAEModelParallelStrategy``, Lightning's ``ModelParallelStrategy`` for a latent-sharded SAE
  (data-parallel gradients, sharded checkpoint folders, layout checks); ``lit-sae fit --trainer.strategy ...``.

The SAE (``lit_sae.sae.model``), its kernels and losses know nothing of distribution; they meet it only through
``TopKSAE.batch_sum`` (a :class:`lit_sae.sae.losses.BatchSum`) and the ``_encode_n``/``_decode_n`` methods that
``ShardedTopKSAE`` overrides.
"""
