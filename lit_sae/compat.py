"""Every use of another package's private API, in one place, each with a test (tests/test_compat.py).

An upgrade of Lightning, torch or jsonargparse that renames one of these fails here and in its test, not somewhere
deep in a training run. Each function says what it reaches into and why no public API does the job.
"""

from __future__ import annotations

from typing import Any, Iterator


# ------------------------------------------------------------------------------------------------------ Lightning
def save_last_checkpoint(callback: Any, trainer: Any) -> None:
    """Make a ``ModelCheckpoint`` write its ``last.ckpt`` now, exactly as its periodic save would.

    Uses ``ModelCheckpoint._save_last_checkpoint`` and ``_monitor_candidates``: the public ``trainer.save_checkpoint``
    would not update the callback's ``last_model_path`` (so the next periodic save would version the file as
    ``last-v1.ckpt``) and would skip its file-name template."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def last_global_step_saved(callback: Any) -> int:
    """The step of a ``ModelCheckpoint``'s latest save (``_last_global_step_saved``; no public accessor)."""
    return int(callback._last_global_step_saved)


def get_checkpoint_io(strategy: Any) -> Any:
    """The strategy's configured checkpoint IO, or None when Lightning would create its default lazily.

    The public ``strategy.checkpoint_io`` property creates the default on first access, which would hide whether
    the user configured a plugin of their own."""
    return strategy._checkpoint_io


def train_dataloader_of(trainer: Any) -> Any:
    """The training DataLoader Lightning built for ``fit`` from a LightningModule/DataModule/dataloader argument
    (``fit_loop._data_source``; ``trainer.train_dataloader`` is only set once the fit loop has started)."""
    return trainer.fit_loop._data_source.dataloader()


def cluster_environment(trainer: Any) -> Any:
    """The trainer's cluster environment plugin (SLURM, torchelastic, ...), as Lightning's own signal handling reads
    it (``trainer._accelerator_connector.cluster_environment``): only parallel strategies expose it publicly."""
    return trainer._accelerator_connector.cluster_environment


def slurm_save_and_requeue(trainer: Any, signum: int) -> None:
    """Lightning's SLURM auto-requeue routine (``trainer._signal_connector._slurm_sigusr_handler_fn``): finalise the
    loggers, save ``hpc_ckpt_N.ckpt`` in the root, ``scontrol requeue`` the job. Called at a step boundary instead of
    from inside the signal handler, so the hpc checkpoint is resumable bit-exactly."""
    trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)


def lightning_restores_signals_to(trainer: Any, handlers: dict) -> None:
    """Make Lightning's signal connector put back ``handlers`` (signal number -> handler) when the trainer tears down,
    instead of the handlers it found installed when the fit started (``trainer._signal_connector._original_handlers``).

    After a failed fit Lightning calls the callbacks' ``on_exception`` first and restores its saved handlers after
    them; a callback that installed its own handlers before Lightning's would find them reinstalled for good (a
    notebook whose Ctrl-C only sets a flag, a test process that ignores its runner's SIGTERM). No public API
    changes what the connector restores."""
    originals = trainer._signal_connector._original_handlers
    for signum, handler in handlers.items():
        if signum in originals:
            originals[signum] = handler


def run_cli_parse_ckpt_path(cli: Any) -> None:
    """LightningCLI's own ``_parse_ckpt_path`` (reloads a checkpoint file's hyperparameters into the model config),
    for subclasses that keep it only for some subcommands."""
    from lightning.pytorch.cli import LightningCLI

    LightningCLI._parse_ckpt_path(cli)


# ---------------------------------------------------------------------------------------------------- jsonargparse
def subcommand_parsers(parser: Any) -> list:
    """The subcommand parsers of a jsonargparse parser (``_subcommands_action._name_parser_map``): needed to switch
    their ``exit_on_error`` off together with the main parser's, so that lit-sae words the error itself."""
    action = getattr(parser, "_subcommands_action", None)
    return list(action._name_parser_map.values()) if action is not None else []


# ----------------------------------------------------------------------------------------------------------- torch
def embedding_bag_per_sample_weights_backward(G, W, flat, offsets, bag) -> Any:
    """``aten._embedding_bag_per_sample_weights_backward`` (mode sum): per-(row, slot) dot products W[idx] . G
    without materialising the gathered rows; the public ``embedding_bag`` has no such entry point."""
    import torch

    return torch.ops.aten._embedding_bag_per_sample_weights_backward(G, W, flat, offsets, bag, 0, -1)


def ddp_find_unused_parameters(strategy: Any) -> bool:
    """Under Lightning's ``DDPStrategy``, have the DDP wrapper it builds in ``strategy.setup`` accept parameters that
    get no gradient in a step (``find_unused_parameters=True``); returns whether the strategy is one. Called from a
    LightningModule's ``setup`` hook, before the wrap.

    ``model.lr: auto`` trains its candidates during the sweep and the chosen SAE after it: each set is unused in the
    other phase, which plain DDP refuses. The strategy's public constructor argument is the user's to set; nothing
    public changes it once the Trainer exists, so this writes ``DDPStrategy._ddp_kwargs``."""
    from lightning.pytorch.strategies import DDPStrategy

    if not isinstance(strategy, DDPStrategy):
        return False
    strategy._ddp_kwargs["find_unused_parameters"] = True
    return True


def private_names() -> Iterator[str]:
    """The private names used above, for the test that they still exist."""
    yield from ("ModelCheckpoint._save_last_checkpoint", "ModelCheckpoint._monitor_candidates",
                "ModelCheckpoint._last_global_step_saved",
                "Trainer._accelerator_connector.cluster_environment", "Strategy._checkpoint_io", "FitLoop._data_source",
                "LightningCLI._parse_ckpt_path",
                "Trainer._signal_connector._slurm_sigusr_handler_fn",
                "Trainer._signal_connector._original_handlers", "ArgumentParser._subcommands_action",
                "aten._embedding_bag_per_sample_weights_backward", "DDPStrategy._ddp_kwargs")
