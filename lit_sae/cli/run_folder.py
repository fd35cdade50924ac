"""``lit-sae validate | test`` on a finished run needs only the run: its saved ``config.yaml`` is used automatically.

A fit saves its resolved configuration as ``<run>/config.yaml`` (``lit_sae.cli.trainer.RunConfig``). Without it a
later ``lit-sae test`` has to repeat the SAE's shape and the data. So, when ``validate`` or ``test`` is given no
``--config``:

- ``--run DIR``: the run folder; its checkpoint is ``--ckpt_path last`` unless one is given;
- ``--ckpt_path PATH`` to a checkpoint inside a run (``<run>/checkpoints/last.ckpt``, any file or sharded folder
  whose ancestors hold a ``config.yaml``): that run;

and the command becomes ``<command> --config <run>/config.yaml --trainer.default_root_dir <run> ...`` followed by
whatever else was typed (so any key can still be overridden, and a preset such as ``--config callbacks/eval.yaml``
adds to it), with the data path of the saved config found again when the command runs from another folder than the
fit did (a relative path is also looked for under the run's ancestors). The report, ``config_test.yaml`` and the
TensorBoard points then go into the run folder. A command whose own ``--config`` has a ``model`` or ``data`` section
(a full recipe) is left as typed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger("lit_sae.cli.main")

__all__ = ["with_run_config", "run_of"]

CONFIG = "config.yaml"
EVALUATING = ("validate", "test")


def _option(argv: list[str], name: str) -> tuple[Optional[str], list[str]]:
    """(value of ``--name V`` / ``--name=V``, argv without it)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == name and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def run_of(ckpt_path: str) -> Optional[Path]:
    """The run folder holding ``ckpt_path``: the nearest ancestor (or the folder itself) with a ``config.yaml``."""
    p = Path(ckpt_path)
    if not p.exists():
        return None
    for folder in ([p] if p.is_dir() else []) + list(p.resolve().parents):
        if (folder / CONFIG).is_file():
            return folder
    return None


def _data_path_override(config: Path, run: Path) -> list[str]:
    """``--data.init_args.path X`` when the saved data path is relative and only exists relative to the run's
    ancestors (the fit ran in one of them), else nothing."""
    import yaml

    try:
        cfg = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    data = cfg.get("data") if isinstance(cfg, dict) else None
    args = data.get("init_args") if isinstance(data, dict) else None
    path = args.get("path") if isinstance(args, dict) else None
    if not isinstance(path, str) or "://" in path or Path(path).is_absolute() or Path(path).exists():
        return []
    for base in [run.resolve(), *run.resolve().parents]:
        if (base / path).exists():
            return ["--data.init_args.path", str(base / path)]
    return []


def _has_recipe(options: list[str]) -> bool:
    """Whether a ``--config`` among ``options`` has a ``model`` or ``data`` section (a recipe, not a preset)."""
    import yaml

    for i, arg in enumerate(options):
        value = options[i + 1] if arg in ("-c", "--config") and i + 1 < len(options) else \
            arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if value is None:
            continue
        try:
            cfg = yaml.safe_load(Path(value).read_text()) if Path(value).is_file() else yaml.safe_load(value)
        except (OSError, yaml.YAMLError):
            return True  # cannot tell: leave the command to LightningCLI as typed
        if not isinstance(cfg, dict) or "model" in cfg or "data" in cfg:
            return True
    return False


def with_run_config(argv: list[str]) -> list[str]:
    """``argv`` (``[command, *options]``) with the run's saved configuration put first (see the module doc); as
    given for other commands, or when ``--config`` is given or no run folder is found.

    Raises FileNotFoundError when ``--run`` names a folder without a ``config.yaml``."""
    if not argv or argv[0] not in EVALUATING:
        return argv
    if _has_recipe(argv[1:]):
        if _option(argv, "--run")[0] is not None:
            raise ValueError("--run: give either --run or a --config with model/data sections (--run uses the run's "
                             "own config.yaml)")
        return argv
    command, options = argv[0], argv[1:]
    run_dir, options = _option(options, "--run")
    ckpt, _ = _option(options, "--ckpt_path")
    if run_dir is not None:
        run = Path(run_dir)
        if not (run / CONFIG).is_file():
            raise FileNotFoundError(f"--run {run}: no {CONFIG} there (the folder `lit-sae fit` wrote, with "
                                    "checkpoints/ and config.yaml); pass --config and --ckpt_path instead")
        if ckpt is None:
            options = ["--ckpt_path", "last", *options]
    elif ckpt is not None and ckpt != "last":
        run = run_of(ckpt)
        if run is None:
            return argv
    else:
        return argv
    config = run / CONFIG
    log.info("%s: using the run's saved configuration %s", command, config)
    return [command, "--config", str(config), "--trainer.default_root_dir", str(run),
            *_data_path_override(config, run), *options]
