"""``SAEConfig`` is the one list of the SAE's settings: ``TopKSAE`` takes exactly its fields, ``SAEModule``'s SAE
arguments are its ``MODULE_KEYS`` with the same defaults, each field is documented, and the lists derived from it
(``config()``, the export's section, the resume checks, the sweep's and the sharded layout's keys) follow it."""

import ast
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch

from lit_sae.sae import config as C
from lit_sae.sae.config import MODULE_KEYS, REBUILD_KEYS, RESUME_KEYS, SHARDED_KEYS, SAEConfig
from lit_sae.sae.model import TopKSAE

FIELDS = {f.name: f for f in dataclasses.fields(SAEConfig)}


def _params(fn) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(fn).parameters.items() if name != "self"}


def test_topksae_takes_exactly_the_config_fields():
    assert set(_params(TopKSAE.__init__)) == set(FIELDS)


def test_saemodule_sae_arguments_are_the_module_keys_with_the_same_defaults():
    from lit_sae.train.module import SAEModule

    params = _params(SAEModule.__init__)
    assert set(params) & set(FIELDS) == set(MODULE_KEYS)
    for key in MODULE_KEYS:
        default = FIELDS[key].default
        expected = inspect.Parameter.empty if default is dataclasses.MISSING else default
        assert params[key].default == expected, f"model.{key}: SAEModule {params[key].default!r}, SAEConfig {expected!r}"


def test_every_field_has_a_docstring():
    tree = ast.parse(Path(C.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SAEConfig")
    documented = set()
    for a, b in zip(cls.body, cls.body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            if isinstance(b.value.value, str) and b.value.value.strip():
                documented.add(a.target.id)
    assert documented == set(FIELDS)


def test_derived_lists():
    assert REBUILD_KEYS == tuple(TopKSAE(8, 32, 4).config())
    assert set(RESUME_KEYS) <= set(MODULE_KEYS) and set(SHARDED_KEYS) <= set(REBUILD_KEYS)
    from lit_sae.artifacts.sharded import CONFIG_KEYS
    from lit_sae.train.resume_checks import RESUME_MUST_MATCH
    from lit_sae.train.sweep import SAE_KEYS

    assert RESUME_MUST_MATCH == (*RESUME_KEYS, "hook_point", "lm_name")
    assert set(SAE_KEYS) == set(MODULE_KEYS) - {"d_in", "fast"}
    assert CONFIG_KEYS == SHARDED_KEYS


@pytest.mark.parametrize("settings", [
    {"d_in": 8, "n_latents": 32, "k": 4},
    {"d_in": 8, "n_latents": 32, "k": 4, "k_aux": 5, "multi_topk": True, "normalize": "layernorm", "fast": False},
    {"d_in": 8, "n_latents": 32, "k": 4, "activation": "jumprelu", "sparsity_coef": 0.1, "jumprelu_bandwidth": 0.01},
    {"d_in": 8, "n_latents": 32, "k": 4, "activation": "matryoshka", "matryoshka_prefixes": [8, 16]},
])
def test_sae_kwargs_build_the_sae_and_config_rebuilds_it(settings):
    sae = TopKSAE(**SAEConfig(**settings).sae_kwargs())
    for key, value in settings.items():
        if key in REBUILD_KEYS and key != "activation":
            assert sae.config()[key] == (value + [32] if key == "matryoshka_prefixes" else value), key
    again = TopKSAE(**sae.config())
    assert again.config() == sae.config()
    assert sae.fast == settings.get("fast", True)


def test_the_export_records_every_setting(tmp_path):
    sae = TopKSAE(8, 32, 4, k_aux=6, multi_topk=True, multi_topk_factor=2)
    with torch.no_grad():
        sae.b_pre.normal_()
    sae.save_pretrained(tmp_path / "x")
    own = json.loads((tmp_path / "x" / "cfg.json").read_text())["lit_sae"]
    expected = {k: v for k, v in sae.config().items() if k not in ("d_in", "n_latents")}
    assert {k: own[k] for k in expected} == expected
