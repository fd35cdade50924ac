"""``DeadLatentTracker``: a read-only view of ``SAEModule``'s dead-latent counters, for callbacks and scripts.

Its public path (``class_path: lit_sae.callbacks.dead_latents.DeadLatentTracker``). The class is defined with the
counters it views, in ``lit_sae.train.dead_latents``, because ``SAEModule.configure_callbacks`` adds it to every
Trainer and the training layer imports no callback.
"""

from lit_sae.train.dead_latents import FIRE_THRESHOLD, DeadLatentTracker

__all__ = ["FIRE_THRESHOLD", "DeadLatentTracker"]
