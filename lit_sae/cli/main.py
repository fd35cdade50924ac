"""The ``lit-sae`` command: LightningCLI for fit / validate / test, ``jsonargparse.CLI`` for the other commands.

No logic lives here. ``main`` chooses between the two parsers by the command name (the table is
``lit_sae.cli.commands``); each command is a function with a typed signature and a docstring in its own module
(``TOOLS``), or ``lit_sae.cli.trainer.SAECLI``. Heavy packages (torch, Lightning) are imported only by the command
that needs them, so ``lit-sae --help`` starts fast.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable, Optional

from lit_sae.cli.commands import LIGHTNING_COMMANDS, SWEEP, TOOLS, description, tool
from lit_sae.cli.errors import USER_ERRORS, ConfigError


def run_tools(argv: list[str]) -> Any:
    """``lit-sae harvest | export | features ...`` parsed by ``jsonargparse.CLI`` from the command's function; anything
    else (``lit-sae``, ``lit-sae --help``, an unknown command) gets the command table."""
    import argparse

    from jsonargparse import CLI, ArgumentParser, DefaultHelpFormatter

    if argv and argv[0] in TOOLS:
        from lit_sae.cli.check import suggesting_parser

        fn = tool(argv[0])
        # allow_abbrev=False: `--ou x` is an unknown key (with a did-you-mean), never silently `--out x`
        return CLI(fn, args=_bare_bool_flags(argv[1:], fn), prog=f"lit-sae {argv[0]}", parser_mode="omegaconf",
                   parser_class=suggesting_parser(), allow_abbrev=False)

    class Formatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Keeps the command table of the description as written."""

    parser = ArgumentParser(prog="lit-sae", usage="lit-sae COMMAND [options]", description=description(),
                            formatter_class=Formatter, allow_abbrev=False)
    parser.add_argument("command", choices=[*TOOLS, *LIGHTNING_COMMANDS, SWEEP[0]], help=argparse.SUPPRESS)
    parser.parse_args(argv[:1])  # prints the table for --help; exit 2 naming the valid commands otherwise
    return None


def _bare_bool_flags(args: list[str], fn: Callable) -> list[str]:
    """``--overwrite`` alone means ``--overwrite true`` for ``fn``'s bool parameters (jsonargparse wants a value)."""
    import inspect

    flags = {f"--{name}" for name, p in inspect.signature(fn).parameters.items() if p.annotation in (bool, "bool")}
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in flags and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append("true")
    return out


def run_lightning(args: Optional[list[str]] = None, **kwargs: Any):
    """``lit-sae fit | validate | test ...`` (see ``lit_sae.cli.trainer.run_lightning``)."""
    from lit_sae.cli.trainer import run_lightning as run

    return run(args, **kwargs)


def check_command_line(argv: list[str], model: str = "module") -> None:
    """Reject a bad fit / validate / test command line before Lightning loads (``lit_sae.cli.check``)."""
    from lit_sae.cli.check import check

    check(argv, model)


def __getattr__(name: str):  # `from lit_sae.cli.main import SAECLI` keeps working without importing Lightning eagerly
    if name == "SAECLI":
        from lit_sae.cli.trainer import SAECLI

        return SAECLI
    raise AttributeError(f"module 'lit_sae.cli.main' has no attribute {name!r}")


def _is_user_error(exn: BaseException) -> bool:
    """Errors that come from the user's input: ours, and Lightning's own rejection of a Trainer setting
    (``MisconfigurationException``; a ``TypeError`` raised while Lightning validates accelerator/devices)."""
    if isinstance(exn, USER_ERRORS) or type(exn).__name__ == "MisconfigurationException":
        return True
    if isinstance(exn, TypeError) and exn.__traceback__ is not None:
        tb = exn.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        return "/lightning/" in where and ("connector" in where or "/accelerators/" in where)
    return False


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``lit-sae`` console script.

    A configuration or data error (ValueError, e.g. ShardError; FileNotFoundError; FloatingPointError on divergence)
    ends the command with its message on stderr and exit status 2, without a traceback (set LIT_SAE_TRACEBACK=1 to
    get one); any other exception propagates.
    """
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_console:  # show lit-sae's own INFO lines (harvest summary, resume, export); libraries keep WARNING
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("lit_sae").addHandler(handler)  # Lightning prints its own lines through its own handler
        logging.getLogger("lit_sae").setLevel(logging.INFO)
        from lit_sae.cli.console import quiet_third_party

        quiet_third_party()
    try:
        if len(argv) > 1 and argv[0] == "sweep" and argv[1] in LIGHTNING_COMMANDS:
            # `lit-sae sweep fit|validate|test --config ...`: several SAEs on one stream (lit_sae.train.sweep)
            check_command_line(argv[1:], model="sweep")
            from lit_sae.train.sweep import SAESweepModule

            # sys.argv stays as typed: DDP re-launches it for the other ranks, which must take this branch too
            run_lightning(argv[1:], model_class=SAESweepModule)
        elif argv and argv[0] in LIGHTNING_COMMANDS:
            from lit_sae.cli.run_folder import with_run_config

            typed, argv = argv, with_run_config(argv)  # validate / test of a run: its saved config.yaml first
            if from_console and argv != typed:
                sys.argv[1:] = argv  # LightningCLI (and DDP's re-launch of this command) read sys.argv
            check_command_line(argv)  # a mistyped key or value fails here, before Lightning loads (~5 s)
            # From the console, LightningCLI reads sys.argv itself (passing it as well makes it warn).
            run_lightning(None if from_console else argv)
        else:
            result = run_tools(argv)
            if isinstance(result, (str, os.PathLike)):  # the command's product (an export folder, the browser's
                print(result)  # index.html) on stdout; a harvest's manifest is summarised by its log line instead
    except Exception as exn:
        if os.environ.get("LIT_SAE_TRACEBACK") or not _is_user_error(exn):
            raise
        sys.stderr.write(f"error: {_user_message(exn)}\n(set LIT_SAE_TRACEBACK=1 for the traceback)\n")
        raise SystemExit(2) from None


def _user_message(exn: BaseException) -> str:
    """The innermost cause's message: jsonargparse wraps a class's own error in type-union noise."""
    while exn.__cause__ is not None and isinstance(exn.__cause__, USER_ERRORS):
        exn = exn.__cause__
    text = str(exn)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own message only
        lines = text.splitlines()
        last = max((i for i, ln in enumerate(lines) if re.match(r"^[\w.]+: ", ln)), default=None)
        if last is not None:
            text = "\n".join(lines[last:]).split(": ", 1)[1]
    if not isinstance(exn, USER_ERRORS):  # Lightning rejected a Trainer setting
        text += (" (a trainer setting: accelerator, devices, precision and strategy must fit this machine; "
                 "`lit-sae fit --help` lists them)")
    return text if isinstance(exn, ConfigError) else f"{type(exn).__name__}: {text}"


if __name__ == "__main__":
    main()
