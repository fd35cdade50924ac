"""The ``lit-sae`` command: LightningCLI's fit / validate / test, plus ``harvest`` and ``export``.

No logic lives here: each subcommand parses a config and calls the library.
"""

from __future__ import annotations

import sys
from typing import Optional

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.cli import LightningCLI

from lit_sae.module import SAEModule

EXTRA = {"harvest": "harvest activations from a language model into webdataset shards",
         "export": "export a checkpoint as cfg.json + sae_weights.safetensors (SAELens layout)"}


class SAECLI(LightningCLI):
    """LightningCLI whose data's ``d_in``, hook point and model name flow into the model (written once)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.d_in", "model.d_in", apply_on="instantiate")
        parser.link_arguments("data.hook_point", "model.hook_point", apply_on="instantiate")
        parser.link_arguments("data.model_name", "model.lm_name", apply_on="instantiate")


def run_lightning(args: Optional[list[str]] = None) -> SAECLI:
    """fit / validate / test / predict, configured by YAML (omegaconf interpolation) and command-line overrides."""
    return SAECLI(
        SAEModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=args,
        auto_configure_optimizers=False,
    )


def run_harvest(args: list[str]) -> None:
    """``lit-sae harvest --config configs/harvest/X.yaml [--key value ...]``."""
    from lit_sae.data.harvest import run_harvest as harvest

    parser = ArgumentParser(prog="lit-sae harvest", description=EXTRA["harvest"], parser_mode="omegaconf")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(harvest)
    cfg = parser.parse_args(args)
    cfg.pop("config", None)
    harvest(**cfg.as_dict())


def run_export(args: list[str]) -> None:
    """``lit-sae export CKPT --out DIR``: the SAE of a checkpoint (EMA weights when on) in SAELens's layout."""
    from lit_sae.export import export_checkpoint

    parser = ArgumentParser(prog="lit-sae export", description=EXTRA["export"])
    parser.add_argument("ckpt", type=str, help="a checkpoint written by lit-sae fit")
    parser.add_argument("--out", type=str, required=True, help="output folder")
    cfg = parser.parse_args(args)
    print(export_checkpoint(cfg.ckpt, cfg.out))


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``lit-sae`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "harvest":
        return run_harvest(argv[1:])
    if argv and argv[0] == "export":
        return run_export(argv[1:])
    run_lightning(argv)


if __name__ == "__main__":
    main()
