"""Scale-out pieces; everything that runs in a process group lives here.

- ``data_parallel``: the global batch's step on data-parallel ranks: the ranks' codes gathered (``TokenGather``,
  one process's bits) or the losses' statistics summed (``GroupSum``).
- ``collectives``: the candidates' all-gather and the chain a latent-sharded SAE decodes with.
- ``tensor``: ``ShardedTopKSAE``, one SAE split over its latents (exact sharded TopK, AuxK, Multi-TopK, decode).
- ``layout``: which tensors are split over the tensor-parallel ranks, as DTensors, and the files of a sharded
  checkpoint folder (a leaf: every other module here reads the names from it).
- ``dcp``: sharded checkpoints of a bare ``ShardedTopKSAE`` with ``torch.distributed.checkpoint``.
- ``memory``: per-device memory of a training step for a (data x tensor) layout.
- ``sharding``: what ``SAEModule.configure_model`` does under a device mesh (shard the SAE, its EMA and counters),
  and the gather back to one ``TopKSAE`` (the export at the end of a sharded fit).
- ``strategy``: ``SAEModelParallelStrategy``, Lightning's ``ModelParallelStrategy`` for a latent-sharded SAE
  (data-parallel gradients, sharded checkpoint folders, layout checks); ``lit-sae fit --trainer.strategy ...``.

Reading a sharded checkpoint folder in one process (no process group) is ``lit_sae.artifacts.sharded``.
The SAE (``lit_sae.sae.model``), its kernels and losses know nothing of distribution; they meet it only through
``TopKSAE.batch_sum`` (a :class:`lit_sae.sae.losses.BatchSum`) and the ``_encode_n``/``_decode_n`` methods that
``ShardedTopKSAE`` overrides.
"""
