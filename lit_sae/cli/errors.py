"""The command line's error type and the exceptions it reports as the user's (a leaf of ``lit_sae.cli``)."""

from __future__ import annotations

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, NotADirectoryError, FileExistsError)
"""Errors that come from the user's input (a config, a path, data): ``lit-sae`` prints their message on one line
and exits with status 2 instead of a traceback (``lit_sae.cli.main.main``)."""


class ConfigError(ValueError):
    """A command line or YAML that does not parse (unknown key, wrong type or value): shown as it is worded."""
