"""Training: ``module`` (``SAEModule``, the optimisation recipe), ``sweep`` (``SAESweepModule``: several SAEs on one
stream) and ``sweep_table``, ``dead_latents`` (the dead-latent counters' update and their read-only view),
``schedule`` (LR schedule and parameter groups), ``resume_checks`` (what a resumed fit must match), ``rng_state``
(RNG streams, non-finite checks), ``atomic_io`` (checkpoint writes that never leave half a file), ``runs`` (the one
place that names the files of a run folder)."""
