"""``lit-sae fit / validate / test``: LightningCLI with lit-sae's run folder, checkpoint rules and error wording.

What this adds to LightningCLI (no training logic lives here):

- one folder per run (``lit_sae.train.runs``): TensorBoard curves, ``config.yaml``, ``checkpoints/``, the export and the
  report all go under ``trainer.default_root_dir`` unless the config names another place; a resumed run logs into
  the same TensorBoard run as the one it continues;
- which weights a command uses (``runs.resolve_ckpt_path``): ``--ckpt_path last`` is looked up in the run's
  checkpoint folder (and is an error when there is none), a fresh fit refuses a folder that holds another run's
  checkpoints, and validate / test refuse untrained weights unless ``--untrained true``;
- one owner per run folder (``lit_sae.train.run_lock``): a second command on a folder in use stops at once;
- data's ``d_in``, hook point and model name flow into the model (written once), a mistyped key gets the nearest
  valid key suggested, and checkpoints are written atomically.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import Checkpoint as LightningCheckpoint
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_sae import compat
from lit_sae.callbacks.checkpoint import Checkpoint
from lit_sae.callbacks.interrupt import SaveOnInterrupt
from lit_sae.callbacks.progress import QuietProgressBar
from lit_sae.callbacks.settings_check import IneffectiveSettings
from lit_sae.callbacks.tensorboard_layout import TrainingCurvesFirst
from lit_sae.callbacks.writable import check_outputs_writable
from lit_sae.cli.check import add_lit_sae_arguments
from lit_sae.cli.commands import LIGHTNING_COMMANDS
from lit_sae.cli.messages import config_error
from lit_sae.data import datamodule as _datamodule  # noqa: F401  known subclasses of --data (named in --help)
from lit_sae.data import synthetic as _synthetic  # noqa: F401
from lit_sae.fsync import check_writable
from lit_sae.train import context_data as _context_data  # noqa: F401  the KL fine-tune's --data
from lit_sae.train.atomic_io import use_atomic_checkpoints
from lit_sae.train.module import SAEModule
from lit_sae.train.run_lock import RunLock
from lit_sae.train.runs import checkpoint_dir, resolve_ckpt_path

log = logging.getLogger("lit_sae.cli.main")

class RunConfig(SaveConfigCallback):
    """Saves the resolved configuration into the run's folder: ``config.yaml`` for fit, ``config_<stage>.yaml`` for
    validate / test, so an evaluation never replaces the configuration that trained the run."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn enum
        if stage != "fit":
            self.config_filename = f"config_{stage}.yaml"
        super().setup(trainer, pl_module, stage)


class SAECLI(LightningCLI):
    """LightningCLI for ``SAEModule`` and any DataModule, with lit-sae's run folder and checkpoint rules."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (SAEModule has no predict step)."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS}

    def add_core_arguments_to_parser(self, parser) -> None:
        """Model and data options first, then the Trainer's: ``lit-sae fit --help`` starts with lit-sae's own."""
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser) -> None:
        add_lit_sae_arguments(parser)  # the links data -> model and --untrained (shared with the quick check)

    def parse_arguments(self, parser, args) -> None:
        """Parse as LightningCLI does; on an unknown key, add the nearest valid key to jsonargparse's message."""
        parsers = [parser, *compat.subcommand_parsers(parser)]
        for p in parsers:
            p.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except Exception as exn:  # jsonargparse's ArgumentError (or a TypeError from a bad value)
            for p in parsers:
                p.exit_on_error = True
            command = (args if args is not None else sys.argv[1:] or ["fit"])[0]
            command = command if command in LIGHTNING_COMMANDS else "fit"
            raise config_error(exn, command, dict(zip(self.subcommands(), parsers[1:])).get(command, parser)) from None
        for p in parsers:
            p.exit_on_error = True

    def _parse_ckpt_path(self) -> None:
        # Lightning would overwrite the model's settings with the checkpoint's hyperparameters when ckpt_path is a
        # file (not for "last"): a changed --model.lr or n_latents would be ignored without a word. In fit, the config
        # stays authoritative; other subcommands keep Lightning's behaviour (test a checkpoint as it was trained).
        if self.config.get("subcommand") != "fit":
            import pickle

            try:
                compat.run_cli_parse_ckpt_path(self)  # torch.load(weights_only=True) of the checkpoint
            except pickle.UnpicklingError as exn:
                from lit_sae.safe_io import refusal

                command = self.config.get("subcommand")
                raise refusal(self.config.get(command, {}).get("ckpt_path"), exn, "checkpoint") from None

    def instantiate_classes(self) -> None:
        """Instantiate data, model and trainer; refuse a model.d_in that differs from the data's."""
        cfg = self.config.get(str(self.subcommand), self.config)
        given_d_in = cfg.get("model.d_in")
        with _sae_init_for(cfg.get("trainer.strategy")):
            super().instantiate_classes()
        data_d_in = getattr(self.datamodule, "d_in", None)
        if given_d_in is not None and data_d_in is not None and int(given_d_in) != int(data_d_in):
            source = getattr(self.datamodule, "manifest_url", None) or "the data"
            raise ValueError(
                f"model.d_in={given_d_in} differs from the data's d_in={data_d_in} ({source}); model.d_in is read "
                "from the data: remove it from the config (or point data.path at shards of that width)"
            )

    def instantiate_trainer(self, **kwargs: Any):
        """The trainer, with the run folder's defaults where the config says nothing:

        TensorBoard logging directly into ``default_root_dir`` (one run, one folder: no ``lightning_logs/version_N``),
        a ``Checkpoint`` into ``<root>/checkpoints``, a quiet progress bar, checkpoint saves on SIGINT / SIGTERM /
        the cluster's requeue signal, and atomic checkpoint writes unless a checkpoint IO plugin was configured."""
        cfg = self._get(self.config_init, "trainer", default={})
        root = cfg.get("default_root_dir") or "."
        if Path(root).exists() and not Path(root).is_dir():
            raise ValueError(f"trainer.default_root_dir={root} is a file; the run folder must be a folder (new or "
                             "the run's own): choose another path")
        given = cfg.get("callbacks") or []
        given = list(given) if isinstance(given, (list, tuple)) else [given]
        extra = []
        if cfg.get("logger") in (None, True):
            from lightning.pytorch.loggers import TensorBoardLogger

            cfg["logger"] = TensorBoardLogger(save_dir=str(root), name="", version="", default_hp_metric=False)
        if cfg.get("enable_checkpointing") is not False and not _has(given, LightningCheckpoint):
            extra.append(Checkpoint())
        if cfg.get("enable_progress_bar") is not False and not _has(given, ProgressBar):
            extra.append(QuietProgressBar())
        if self.subcommand == "fit":
            extra += [SaveOnInterrupt(), IneffectiveSettings()]
            if cfg.get("logger") is not False:
                extra.append(TrainingCurvesFirst())
        cfg["callbacks"] = given + extra
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        _say_if_substituted("precision", cfg.get("precision"), trainer.precision)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the command holding the run folder's lock (``lit_sae.train.run_lock``): taken before anything is
        written there (config, checkpoints, events, report), released when the command ends; only global rank 0 of a
        launch takes it. A second command on the same folder stops here, naming the holder."""
        lock = None
        root = str(self.trainer.default_root_dir)
        if self.trainer.global_rank == 0 and "://" not in root:  # a remote root (s3://...) has no OS lock
            check_writable(root, "trainer.default_root_dir")  # the lock is the first file written there
            lock = RunLock(root).acquire()
        try:
            super()._run_subcommand(subcommand)
        finally:
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------ which weights each command uses
    def _resolve_weights(self, command: str) -> None:
        cfg = self.config_init[command]
        root = self.trainer.default_root_dir
        folders = [Path(cb.dirpath) if cb.dirpath else checkpoint_dir(root)
                   for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)] or [
                      checkpoint_dir(root)]
        init_from = getattr(self.model, "hparams", {}).get("init_from")
        path = resolve_ckpt_path(command, cfg.get("ckpt_path"), folders, init_from=init_from,
                                 untrained=bool(cfg.get("untrained")), root=root)
        cfg["ckpt_path"] = path
        if path is not None:
            log.info("%s starts from %s", command, path)

    def before_fit(self) -> None:
        check_outputs_writable(self.trainer, self.model, "fit")  # before Lightning creates the first folder
        self._resolve_weights("fit")

    def before_validate(self) -> None:
        check_outputs_writable(self.trainer, self.model, "validate")
        self._resolve_weights("validate")

    def before_test(self) -> None:
        check_outputs_writable(self.trainer, self.model, "test")
        self._resolve_weights("test")


def _sae_init_for(strategy: Any):
    """The SAE's construction context: on the meta device when the strategy shards it (``lit_sae.parallel.sharding``),
    so the full matrices are never allocated; the usual one otherwise."""
    from contextlib import nullcontext

    path = strategy.get("class_path") if hasattr(strategy, "get") else strategy
    if not isinstance(path, str) or "." not in path:
        return nullcontext()
    from lightning.pytorch.strategies import ModelParallelStrategy

    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(__import__(module_name, fromlist=[name]), name)
    except (ImportError, AttributeError):
        return nullcontext()
    if not (isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)):
        return nullcontext()
    from lit_sae.parallel.sharding import deferred_sae_init

    return deferred_sae_init()


PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}


def _say_if_substituted(key: str, asked: Any, used: Any) -> None:
    """One log line where Lightning runs with another setting than the one asked for (e.g. a precision the
    hardware lacks), instead of a warning lost among others."""
    if asked is None:
        return
    canonical = PRECISION_ALIASES.get(str(asked), str(asked))
    if canonical != str(used):
        log.warning("trainer.%s=%s is not available here: Lightning runs with %s", key, asked, used)


def _has(callbacks: list, kind: type) -> bool:
    return any(isinstance(cb, kind) for cb in callbacks)


def run_lightning(args: Optional[list[str]] = None, cli_class: type[SAECLI] = SAECLI,
                  model_class: Optional[type] = None, **kwargs: Any) -> SAECLI:
    """fit / validate / test, configured by YAML (omegaconf interpolation) and command-line overrides.

    ``cli_class`` and ``kwargs`` (e.g. ``run=False``) let tests parse exactly as the command does; ``model_class``:
    the LightningModule (default ``SAEModule``; ``lit-sae sweep`` passes ``lit_sae.train.sweep.SAESweepModule``)."""
    return cli_class(
        model_class or SAEModule,
        subclass_mode_data=True,
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        # allow_abbrev=False (jsonargparse passes it on to the subcommands' parsers): `--trainer.max_step 2` is an
        # unknown key with a did-you-mean, never silently `--trainer.max_steps 2` (argparse's prefix matching)
        parser_kwargs={"parser_mode": "omegaconf+", "prog": "lit-sae", "allow_abbrev": False},
        args=args,
        auto_configure_optimizers=False,
        **kwargs,
    )
