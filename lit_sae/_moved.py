"""Old module paths of lit-sae, kept importable after the regroup into one package per job (CHANGELOG, 0.2.0).

A user's YAML (``class_path: lit_sae.module.SAEModule``), script or notebook that names a module by its former path
gets the module at its new path: the very same module object, so classes compare equal and ``isinstance`` holds.
Nothing inside lit-sae imports a former path (``tests/test_layout.py`` checks both).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "lit_sae.activations": "lit_sae.sae.activations",
    "lit_sae.kernels": "lit_sae.sae.kernels",
    "lit_sae.selection": "lit_sae.sae.selection",
    "lit_sae.losses": "lit_sae.sae.losses",
    "lit_sae.median": "lit_sae.sae.median",
    "lit_sae.checks": "lit_sae.sae.checks",
    "lit_sae.ema": "lit_sae.sae.ema",
    "lit_sae.sae_io": "lit_sae.sae.io",
    "lit_sae.load": "lit_sae.artifacts.load",
    "lit_sae.export": "lit_sae.artifacts.export",
    "lit_sae.hub": "lit_sae.data.hub",
    "lit_sae.data.format": "lit_sae.data.shard_format",
    "lit_sae.metrics": "lit_sae.eval.metrics",
    "lit_sae.module": "lit_sae.train.module",
    "lit_sae.module_resume": "lit_sae.train.resume_checks",
    "lit_sae.resume_state": "lit_sae.train.rng_state",
    "lit_sae.schedule": "lit_sae.train.schedule",
    "lit_sae.sweep": "lit_sae.train.sweep",
    "lit_sae.sweep_table": "lit_sae.train.sweep_table",
    "lit_sae.checkpoint_io": "lit_sae.train.atomic_io",
    "lit_sae.runs": "lit_sae.train.runs",
    "lit_sae.parallel.checkpoint": "lit_sae.parallel.dcp",
    "lit_sae.parallel.module": "lit_sae.parallel.sharding",
    "lit_sae.console": "lit_sae.cli.console",
    "lit_sae.trainer_cli": "lit_sae.cli.trainer",
    "lit_sae.cli_check": "lit_sae.cli.check",
    "lit_sae.cli_messages": "lit_sae.cli.messages",
    "lit_sae.commands.export": "lit_sae.cli.export_command",
    "lit_sae.commands": "lit_sae.cli.export_command",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a former module path and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        """Nothing to run: the module at its new path was imported (and ran) in ``create_module``."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``import lit_sae`` calls it)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
