"""The ``lit-sae`` command: LightningCLI's fit / validate / test, plus ``harvest`` and ``export``.

No logic lives here: each subcommand parses a config and calls the library.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import sys
from typing import Any, Optional

from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.cli import LightningCLI

from lit_sae.checkpoint_io import use_atomic_checkpoints
from lit_sae.module import SAEModule

EXTRA = {"harvest": "harvest activations from a language model into webdataset shards",
         "export": "export a checkpoint as cfg.json + sae_weights.safetensors (SAELens layout)"}


class SAECLI(LightningCLI):
    """LightningCLI whose data's ``d_in``, hook point and model name flow into the model (written once).

    Also: checkpoints are written atomically (``AtomicCheckpointIO``), a mistyped config key gets the nearest valid
    key suggested, and ``fit --ckpt_path`` never replaces the config's model settings by the checkpoint's (a
    mismatch is reported by ``SAEModule.on_load_checkpoint`` instead of being silently ignored).
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.d_in", "model.d_in", apply_on="instantiate")
        parser.link_arguments("data.hook_point", "model.hook_point", apply_on="instantiate")
        parser.link_arguments("data.model_name", "model.lm_name", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        """Parse as LightningCLI does; on an unknown key, add the nearest valid key to jsonargparse's message."""
        parsers = [parser, *_subcommand_parsers(parser)]
        for p in parsers:
            p.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except Exception as exn:  # jsonargparse's ArgumentError (or a TypeError from a bad value)
            for p in parsers:
                p.exit_on_error = True
            message = str(exn).strip().rstrip(".")
            parser.error(message + _suggest_key(message))
        for p in parsers:
            p.exit_on_error = True

    def _parse_ckpt_path(self) -> None:
        # Lightning would overwrite the model's settings with the checkpoint's hyperparameters when ckpt_path is a
        # file (not for "last"): a changed --model.lr or n_latents would be ignored without a word. In fit, the config
        # stays authoritative; other subcommands keep Lightning's behaviour (test a checkpoint as it was trained).
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """Instantiate data, model and trainer; refuse a model.d_in that differs from the data's."""
        cfg = self.config.get(str(self.subcommand), self.config)
        given_d_in = cfg.get("model.d_in")
        super().instantiate_classes()
        data_d_in = getattr(self.datamodule, "d_in", None)
        if given_d_in is not None and data_d_in is not None and int(given_d_in) != int(data_d_in):
            source = getattr(self.datamodule, "manifest_url", None) or "the data"
            raise ValueError(
                f"model.d_in={given_d_in} differs from the data's d_in={data_d_in} ({source}); model.d_in is read "
                "from the data: remove it from the config (or point data.path at shards of that width)"
            )

    def instantiate_trainer(self, **kwargs: Any):
        """The trainer, with atomic checkpoint writes unless the config chose a checkpoint IO plugin."""
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer


def _subcommand_parsers(parser) -> list:
    action = getattr(parser, "_subcommands_action", None)
    return list(action._name_parser_map.values()) if action is not None else []


_UNKNOWN_KEY = (  # how jsonargparse 4.x names an unknown key
    r"does not accept option '([\w.]+)'",
    r"unrecognized arguments: --([\w.]+)",
    r"No action for key \"?'?([\w.]+)",
)


def _suggest_key(message: str) -> str:
    """'; did you mean X?' for the first unknown key named in a jsonargparse error message ('' if none)."""
    if m := re.search(r"Linked \"model\.(\w+)\" must be given via", message):
        return (f"; model.{m.group(1)} is read from the data (the manifest, for shard folders): remove "
                f"model.{m.group(1)} from the command line and config")
    for pattern in _UNKNOWN_KEY:
        if m := re.search(pattern, message):
            key = m.group(1)
            break
    else:
        if "'init_args': {" in message:  # a subclass's init_args failed as a whole: find the unknown one
            return _suggest_init_arg(message)
        return ""
    parts = key.split(".")
    if parts and parts[0] in ("fit", "validate", "test", "predict"):
        parts = parts[1:]
    prefix, name = parts[:-1], parts[-1]
    candidates = _valid_names(prefix)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {'.'.join(prefix + close)!r}?"
    return ""


def _valid_names(prefix: list[str]) -> list[str]:
    """Parameter names at a config path: model -> SAEModule's, trainer -> Trainer's, top level -> sections."""
    import lightning as L

    if prefix == ["model"]:
        return list(inspect.signature(SAEModule.__init__).parameters)[1:]
    if prefix == ["trainer"]:
        return list(inspect.signature(L.Trainer.__init__).parameters)[1:]
    if not prefix:
        return ["seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path", "config"]
    return []


def _suggest_init_arg(message: str) -> str:
    """For a subclass (data: class_path + init_args) rejected as a whole: name the init arg it does not take."""
    m = re.search(r"'class_path': '([\w.]+)', 'init_args': \{([^}]*)\}", message)
    if not m:
        return ""
    module_name, _, cls_name = m.group(1).rpartition(".")
    try:
        cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
    except (ImportError, AttributeError):
        return ""
    valid = list(inspect.signature(cls.__init__).parameters)[1:]
    for given in re.findall(r"'(\w+)':", m.group(2)):
        if given not in valid:
            close = difflib.get_close_matches(given, valid, n=1, cutoff=0.6)
            hint = f"; did you mean 'init_args.{close[0]}'?" if close else f"; valid: {', '.join(valid)}"
            return f"\n{cls_name} has no argument {given!r}{hint}"
    return ""


def run_lightning(args: Optional[list[str]] = None, cli_class: type[SAECLI] = SAECLI, **kwargs: Any) -> SAECLI:
    """fit / validate / test / predict, configured by YAML (omegaconf interpolation) and command-line overrides.

    ``cli_class`` and ``kwargs`` (e.g. ``run=False``) let tests parse exactly as the command does."""
    return cli_class(
        SAEModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=args,
        auto_configure_optimizers=False,
        **kwargs,
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
    """Entry point of the ``lit-sae`` console script.

    A configuration or data error (ValueError, e.g. ShardError; FileNotFoundError; FloatingPointError on divergence)
    ends the command with its message on stderr and exit status 2, without a traceback (set LIT_SAE_TRACEBACK=1 to
    get one); any other exception propagates.
    """
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_console:  # show lit-sae's own INFO lines (harvest summary, resume, export); libraries keep WARNING
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("lit_sae").setLevel(logging.INFO)
    try:
        if argv and argv[0] == "harvest":
            return run_harvest(argv[1:])
        if argv and argv[0] == "export":
            return run_export(argv[1:])
        if argv and argv[0] == "features":  # feature browser (lit_sae/features/run.py)
            from lit_sae.features.run import cli_main

            return cli_main(argv[1:])
        # From the console, LightningCLI reads sys.argv itself (passing it as well makes it warn).
        run_lightning(None if from_console else argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as exn:
        if os.environ.get("LIT_SAE_TRACEBACK"):
            raise
        sys.stderr.write(f"error: {_user_message(exn)}\n(set LIT_SAE_TRACEBACK=1 for the traceback)\n")
        raise SystemExit(2) from None


def _user_message(exn: BaseException) -> str:
    """The innermost cause's message: jsonargparse wraps a class's own error in type-union noise."""
    while exn.__cause__ is not None and isinstance(exn.__cause__, (ValueError, FileNotFoundError,
                                                                   FloatingPointError)):
        exn = exn.__cause__
    text = str(exn)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own message only
        lines = text.splitlines()
        last = max((i for i, ln in enumerate(lines) if re.match(r"^[\w.]+: ", ln)), default=None)
        if last is not None:
            text = "\n".join(lines[last:]).split(": ", 1)[1]
    return f"{type(exn).__name__}: {text}"


if __name__ == "__main__":
    main()
