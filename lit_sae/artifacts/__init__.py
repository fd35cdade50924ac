"""The files an SAE run leaves and that others hand you: ``load`` (any SAE layout lit-sae reads, or a checkpoint),
``export`` (SAELens, sparsify or OpenAI layout with provenance), ``sharded`` (a latent-sharded checkpoint folder
reassembled into one SAE in one process)."""
