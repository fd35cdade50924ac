"""jsonargparse's errors for ``lit-sae fit | validate | test`` as one line that names the key and the fix.

Used by LightningCLI's parse (``lit_sae.cli.trainer.SAECLI``) and by the quick check before it
(``lit_sae.cli.check``); light to import (no torch, no Lightning): the valid names come from the parser at hand.
"""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Any

from lit_sae.cli.commands import LIGHTNING_COMMANDS
from lit_sae.cli.errors import ConfigError

_UNKNOWN_KEY = (  # how jsonargparse 4.x names an unknown key
    r"unknown key ([\w.]+) in the config",
    r"does not accept option '([\w.]+)'",
    r"unrecognized arguments: (?:\w+ )?--([\w.]+)",  # LightningCLI names the subcommand first
    r"No action for key \"?'?([\w.]+)",
)


def config_error(exn: BaseException, command: str, parser: Any) -> ConfigError:
    """The one-line ConfigError for jsonargparse's error ``exn`` while parsing ``lit-sae <command>`` with ``parser``
    (the subcommand's parser: its option names are the valid keys)."""
    message = shorten_union(str(exn).strip().rstrip("."))
    # A YAML section's unknown key, named with its section (as the command line would name it)
    message = re.sub(r"Group '([\w.]+)' does not accept option '([\w.]+)'", r"unknown key \1.\2 in the config",
                     message)
    text = f"{message}{suggest_key(message, parser)} (`lit-sae {command} --help` lists the options)"
    return ConfigError(" ".join(text.split()))


def shorten_union(message: str) -> str:
    """jsonargparse's 12-line 'Does not validate against any of the Union subtypes' as one line: the class's own
    complaint for a subclass (``data``), else the valid values."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    key = re.search(r'Parser key "([\w.]+)"', message)
    key_name = key.group(1) if key else "a key"
    problem = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*(.*)", message)
    if problem:
        class_path, reason = problem.groups()
        option = re.search(r"Option '(\w+)' is not accepted", reason)
        if option:
            return (f"{key_name}: {class_path} has no argument {option.group(1)!r}"
                    f"{_close_init_arg(class_path, option.group(1))}")
        return f"{key_name}: class_path {class_path}: {reason.strip()}"
    given = re.search(r"Given value: (.*)", message)
    allowed: list[str] = []
    for group in re.findall(r"Literal\[([^\]]*)\]", message.split("Errors:")[0]):
        allowed += [v.strip() for v in group.split(",") if v.strip() not in allowed]
    kinds = sorted(set(re.findall(r"Expected a <class '(\w+)'>", message)) - {"NoneType"})
    valid = ", ".join(dict.fromkeys(allowed + kinds))
    return (f"{key_name}: invalid value {given.group(1).strip() if given else ''!s}; "
            f"valid: {valid or 'see --help'}")


def suggest_key(message: str, parser: Any) -> str:
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
    if parts and parts[0] in LIGHTNING_COMMANDS:
        parts = parts[1:]
    prefix, name = parts[:-1], parts[-1]
    close = difflib.get_close_matches(name, valid_names(parser, prefix), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {'.'.join(prefix + close)!r}?"
    return ""


def valid_names(parser: Any, prefix: list[str]) -> list[str]:
    """The option names of ``parser`` one level under ``prefix`` (``["model"]`` -> n_latents, k, ...; ``[]`` -> the
    sections and top-level options)."""
    names: dict[str, None] = {}
    depth = len(prefix)
    for action in getattr(parser, "_actions", []):
        for dest in [action.dest, *getattr(action, "dest_aliases", [])] if isinstance(action.dest, str) else []:
            parts = dest.split(".")
            if len(parts) > depth and parts[:depth] == prefix and parts[depth] != "help":
                names[parts[depth]] = None
    return list(names)


def _close_init_arg(class_path: str, given: str) -> str:
    valid = _init_args(class_path)
    if not valid:
        return ""
    close = difflib.get_close_matches(given, valid, n=1, cutoff=0.6)
    return f"; did you mean 'init_args.{close[0]}'?" if close else f"; valid: {', '.join(valid)}"


def _init_args(class_path: str) -> list[str]:
    module_name, _, cls_name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
        return list(inspect.signature(cls.__init__).parameters)[1:]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _suggest_init_arg(message: str) -> str:
    """For a subclass (data: class_path + init_args) rejected as a whole: name the init arg it does not take."""
    m = re.search(r"'class_path': '([\w.]+)', 'init_args': \{([^}]*)\}", message)
    if not m:
        return ""
    valid = _init_args(m.group(1))
    for given in re.findall(r"'(\w+)':", m.group(2)):
        if valid and given not in valid:
            close = difflib.get_close_matches(given, valid, n=1, cutoff=0.6)
            hint = f"; did you mean 'init_args.{close[0]}'?" if close else f"; valid: {', '.join(valid)}"
            return f"\n{m.group(1).rpartition('.')[2]} has no argument {given!r}{hint}"
    return ""
