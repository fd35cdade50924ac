"""A sweep's SAEs as settings: the per-SAE keys (``SAE_KEYS``, ``TRAINING_KEYS``, ``DATA_KEYS``) and
``expand_specs``, which turns ``model.saes`` and ``model.grid`` into one named settings dict per SAE."""

from __future__ import annotations

import itertools
import re
from typing import Any, Optional

from lit_sae.sae import activations
from lit_sae.sae.config import MODULE_KEYS

#: Per-SAE settings of a sweep: ``SAEModule``'s SAE arguments (``lit_sae.sae.config.MODULE_KEYS``) but d_in (the
#: data's, shared) and fast (a sweep always runs the sparse kernels).
SAE_KEYS = tuple(key for key in MODULE_KEYS if key not in ("d_in", "fast"))
#: Per-SAE optimisation settings (as ``SAEModule``'s): Adam's lr, linear warm-up steps, the fraction of the run after
#: which the lr decays linearly to 0, the decay of an EMA of the weights used for validation, test and export, and
#: a jumprelu SAE's threshold learning rate as a multiple of its lr.
TRAINING_KEYS = ("lr", "warmup_steps", "decay_start", "ema_decay", "jumprelu_threshold_lr_scale")
#: Per-SAE data settings: the hook point the SAE reads (``batch["acts@{hook_point}"]`` of a DataModule reading several
#: hook points from one LM pass; default: the data's main hook point, ``batch["acts"]``) and its width (default: the
#: model's ``d_in``; checked against the data's).
DATA_KEYS = ("hook_point", "d_in")


def expand_specs(saes: Optional[list[dict[str, Any]]], grid: Optional[dict[str, list]],
                 defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """One settings dict per SAE: ``defaults`` updated by each entry of ``saes``, then by each point of the Cartesian
    product of ``grid`` (keys of ``SAE_KEYS`` and ``TRAINING_KEYS``). Every dict gets a ``name``: the entry's name (or
    its settings) followed by its grid values, e.g. ``topk-n_latents4096``. Raises ValueError naming the key for
    unknown keys, an empty grid list, duplicate names, and an architecture setting an entry or the grid gives to an
    activation it does not apply to (``lit_sae.sae.activations.APPLIES_TO``; ``defaults`` may hold settings of several
    architectures)."""
    allowed = set(SAE_KEYS) | set(TRAINING_KEYS) | set(DATA_KEYS) | {"name"}
    base = [dict(s) for s in (saes or [{}])]
    for i, spec in enumerate(base):
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"model.saes[{i}]: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    grid = dict(grid or {})
    unknown = sorted(set(grid) - (allowed - {"name"}))
    if unknown:
        raise ValueError(f"model.grid: unknown key(s) {unknown}; allowed: {sorted(allowed - {'name'})}")
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"model.grid.{key}={values!r}: give a non-empty list of values")
    specs = []
    for spec in base:
        for point in itertools.product(*grid.values()):
            s = {**defaults, **spec, **dict(zip(grid, point))}
            suffix = [f"{k}{v}" for k, v in zip(grid, point)]
            if "name" in spec:
                s["name"] = "-".join([str(spec["name"]), *suffix])
            else:
                s["name"] = "-".join([f"{k}{v}" for k, v in spec.items()] + suffix) or "sae"
            s["name"] = re.sub(r"[^A-Za-z0-9_\-]", "_", str(s["name"]))
            own = {**spec, **dict(zip(grid, point))}
            activations.check_applicable(s.get("activation", "topk"), own, f"model.saes[{s['name']}].", s)
            specs.append(s)
    names = [s["name"] for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"model.saes: duplicate SAE names {dup}: give each entry a distinct 'name'")
    return specs
