"""Explanations in words: an LLM explains each latent from its activating contexts, and other prompts score the
explanation on held-out text by detection and fuzzing (EleutherAI's delphi; Paulo et al., 2024, "Automatically
Interpreting Millions of Features in Large Language Models").

One job per file: ``examples`` (which contexts the explainer and the scorers see), ``prompts`` (the messages and
their parsing), ``backend`` / ``local`` / ``openai_api`` (who answers), ``cache`` (every prompt and reply, by
content), ``scorers`` (per-latent accuracy, F1, AUROC), ``pipeline`` (explain then score), ``agreement`` (a second
backend against the first), ``publish`` (results.json, explanations, report, TensorBoard, browser data) and
``run`` (the ``lit-sae explain`` command). Layout and definitions: docs/autointerp.md.
"""
