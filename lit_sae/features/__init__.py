"""The feature browser: per-latent statistics (collect), decoder statistics (decoder), the page and its data
(write), and the ``lit-sae features`` command (run). See docs/feature-browser.md."""
