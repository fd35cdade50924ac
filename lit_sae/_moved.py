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
    "lit_sae.parallel.data": "lit_sae.parallel.data_parallel",  # data parallelism, not the data package
    "lit_sae.reproduce.plan": "lit_sae.reproduce.grid",  # the SAEs to train, not data.plan's read order
    "lit_sae.console": "lit_sae.cli.console",
    "lit_sae.trainer_cli": "lit_sae.cli.trainer",
    "lit_sae.cli_check": "lit_sae.cli.check",
    "lit_sae.cli_messages": "lit_sae.cli.messages",
    "lit_sae.commands.export": "lit_sae.cli.export_command",
}

# Former packages: {path: (module now holding its names, those names)}. ``lit_sae.commands`` was a package whose
# ``__init__`` re-exported ``export`` from its submodule ``lit_sae.commands.export``; it is rebuilt as such (a module
# with a package path, so the submodule's former path imports too), its names taken from the new module.
PACKAGES = {
    "lit_sae.commands": ("lit_sae.cli.export_command", ("export",)),
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a former module path and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        if fullname in PACKAGES:
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        if spec.name in PACKAGES:
            return None  # a fresh module with a package path, filled in exec_module
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        """A moved module: nothing to run, the module at its new path was imported (and ran) in ``create_module``.
        A former package: import its former submodules (as its ``__init__`` did), then bind its names."""
        if module.__name__ not in PACKAGES:
            return
        target, names = PACKAGES[module.__name__]
        for sub in (name for name in MOVED if name.startswith(module.__name__ + ".")):
            importlib.import_module(sub)
        new = importlib.import_module(target)
        for name in names:
            setattr(module, name, getattr(new, name))
        module.__all__ = list(names)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``import lit_sae`` calls it)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
