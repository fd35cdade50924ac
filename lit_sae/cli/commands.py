"""The command table of ``lit-sae``: every command's name, where it lives and its line in ``lit-sae --help``.

A leaf of the command line (no import of torch, Lightning or the rest of ``lit_sae.cli``): ``main`` dispatches on it,
``messages`` strips a command name from a key with it, ``trainer`` restricts LightningCLI to its commands.
"""

from __future__ import annotations

from typing import Callable

# The commands LightningCLI runs (lit_sae.cli.trainer.SAECLI), each with its line in `lit-sae --help`.
LIGHTNING_COMMANDS = {
    "fit": "Train an SAE on activation shards into a run folder (resume with --ckpt_path last).",
    "validate": "Validation metrics (val/nmse, val/l0) of a run's checkpoint.",
    "test": "Test metrics of a run's checkpoint; with callbacks/eval.yaml the full evaluation report.",
}
SWEEP = ("sweep", "fit | validate | test of several SAEs on one activation stream (configs/sweep.yaml).")

INTRO = "lit-sae: TopK sparse autoencoders (Gao et al., 2024) on PyTorch Lightning."


# The commands that are plain functions, in workflow order: name -> (module, function, its line in `lit-sae --help`,
# which tests/cli/test_cli_console.py keeps equal to the function's first docstring line). jsonargparse builds a
# command's options from the function's signature and docstring; only the command that runs is imported, so
# `lit-sae --help` loads neither torch nor Lightning.
TOOLS = {
    "harvest": ("lit_sae.data.harvest", "run_harvest",
                "Harvest activations of model at hook_point over a text source into webdataset shards."),
    "export": ("lit_sae.cli.export_command", "export", "Export a checkpoint's SAE (its EMA weights when EMA was on) "
               "for SAELens (default), sparsify or OpenAI's layout."),
    "features": ("lit_sae.features.run", "features",
                 "Collect per-latent statistics of an SAE and write the feature browser; returns the path of "
                 "index.html."),
    "explain": ("lit_sae.autointerp.run", "explain",
                "Explain a sample of an SAE's latents with an LLM and score them by detection and fuzzing; returns "
                "results.json."),
    "reproduce": ("lit_sae.reproduce.run", "reproduce",
                  "Reproduce the claims of Gao et al. (2024) on a harvest: figures, reproduce.md and reproduce.json."),
}


def tool(name: str) -> Callable:
    """The function behind the command ``name`` (a key of ``TOOLS``)."""
    from importlib import import_module

    module, function, _ = TOOLS[name]
    return getattr(import_module(module), function)


def description() -> str:
    """``lit-sae --help``'s table: every command with one line, the LightningCLI ones after harvest."""
    lines = {name: line for name, (_, _, line) in TOOLS.items()}
    ordered = ({k: lines[k] for k in list(lines)[:1]} | LIGHTNING_COMMANDS | dict([SWEEP])
               | {k: lines[k] for k in list(lines)[1:]})
    width = max(map(len, ordered)) + 3
    table = "\n".join(f"  {name:<{width}}{text}" for name, text in ordered.items())
    return f"{INTRO}\n\nCommands (`lit-sae COMMAND --help` shows the options of each):\n{table}\n"
