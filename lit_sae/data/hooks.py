"""Hook points: the places of a ``transformers`` causal LM where activations are read (and spliced).

Two kinds of names are accepted (docs/streaming.md has the table per architecture):

* **Module paths** of the loaded model with a port: ``"<path>:input"`` or ``"<path>:output"``, where ``<path>`` is
  a name from ``model.named_modules()`` (e.g. ``model.layers.3.mlp:input`` on Llama/Qwen/Gemma,
  ``transformer.h.3.mlp:output`` on GPT-2, ``gpt_neox.layers.3.mlp:input`` on GPT-NeoX). ``:output`` is the
  module's output (the first element of a tuple); ``:input`` is its first positional argument (or its
  ``hidden_states`` keyword). The port is required, so a path can never be read at the wrong side of a module.
* **TransformerLens aliases** (``blocks.{L}.<kind>``), with TransformerLens's meaning (its ``TransformerBlock``):

  ====================  =====================================================================================
  hook_resid_pre        residual stream entering block L (the decoder layer's input; block 0: the embeddings)
  hook_attn_out         what the attention sublayer adds to the residual (attention output; on sandwich-norm
                        models such as Gemma 2/3, after the post-attention norm)
  hook_resid_mid        resid_pre + attn_out (absent on parallel-residual blocks, e.g. GPT-NeoX's default)
  hook_mlp_in           the MLP sublayer's input **before** its norm, as in TransformerLens (= resid_mid;
                        = resid_pre on parallel-residual blocks)
  ln2.hook_normalized   the MLP module's input, **after** the pre-MLP norm: what a transcoder reads
  ln1.hook_normalized   the attention module's input, after the pre-attention norm
  hook_mlp_out          what the MLP sublayer adds to the residual (MLP output; after the post-MLP norm on
                        sandwich-norm models)
  hook_resid_post       residual stream leaving block L (the decoder layer's output; before the final norm)
  ====================  =====================================================================================

  Each kind is also accepted without its ``hook_`` prefix (``blocks.3.resid_pre``), the spelling of the issue's
  readable aliases. Every alias is a read of one module's input or output (:class:`HookSite`), except
  ``hook_resid_mid`` on blocks where no module receives it as is; see :func:`resolve_site`.

Unknown names raise :class:`HookPointError`, one line listing what exists on the loaded model. A "did you mean"
is only offered for a name of the same place spelled differently (same layer and the same kind, or a module path
with the same layer numbers), never for a neighbouring place (``blocks.10.hook_resid_pre`` is not ``..._post``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

# Attribute names that hold the decoder layers and their parts, across transformers architectures.
_LAYER_LISTS = ("layers", "h", "blocks", "layer")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_PRE_ATTN_NORMS = ("input_layernorm", "ln_1")
_SANDWICH_PRE_MLP = "pre_feedforward_layernorm"  # Gemma 2/3: its presence means post_attention_layernorm is a post-norm
_PRE_MLP_NORMS = ("post_attention_layernorm", "ln_2")
_POST_MLP_NORM = "post_feedforward_layernorm"

#: The alias kinds, in the order a block computes them.
ALIAS_KINDS = ("hook_resid_pre", "ln1.hook_normalized", "hook_attn_out", "hook_resid_mid", "hook_mlp_in",
               "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post")
_ALIAS_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_PATH_RE = re.compile(r"^(.+):(input|output)$")


class HookPointError(ValueError):
    """An unknown or unusable hook point name (one line: the name, what exists, the fix)."""


@dataclass(frozen=True)
class HookSite:
    """Where a hook point's activation is read.

    ``module``'s ``port`` ("input" or "output") is the activation (B, T, d), except when ``residual_of`` is set:
    then the activation is ``module``'s input (``hook_resid_mid`` read at the pre-MLP norm's input), and splicing
    it must also move the block's residual (see :func:`lit_sae.data.lm.splice`).
    """

    name: str
    module: nn.Module
    port: str
    #: Decoder layer index (None for a module path outside the layers, e.g. ``model.embed_tokens:output``).
    layer: Optional[int]
    #: The decoder layer whose output carries this residual on (set only for ``hook_resid_mid``).
    residual_of: Optional[nn.Module] = None


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


def child(layer: nn.Module, names: tuple[str, ...]) -> Optional[nn.Module]:
    """The first of ``names`` that is a submodule of ``layer`` (None if none is)."""
    for name in names:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def is_parallel(model: nn.Module) -> bool:
    """True when attention and MLP both read the block's input (GPT-NeoX/GPT-J style): no resid_mid exists."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False))


def _block_sites(model: nn.Module, layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Alias kind -> (module, port) for one decoder layer; kinds the layer does not have are absent."""
    attn, mlp = child(layer, _ATTN_NAMES), child(layer, _MLP_NAMES)
    sandwich = isinstance(getattr(layer, _SANDWICH_PRE_MLP, None), nn.Module)
    pre_attn = child(layer, _PRE_ATTN_NORMS)
    pre_mlp = getattr(layer, _SANDWICH_PRE_MLP) if sandwich else child(layer, _PRE_MLP_NORMS)
    sites: dict[str, tuple[nn.Module, str]] = {"hook_resid_pre": (layer, "input"), "hook_resid_post": (layer, "output")}
    if attn is not None:
        post_attn = getattr(layer, "post_attention_layernorm", None) if sandwich else None
        sites["hook_attn_out"] = (post_attn, "output") if isinstance(post_attn, nn.Module) else (attn, "output")
    if pre_attn is not None:
        sites["ln1.hook_normalized"] = (pre_attn, "output")
    if mlp is not None:
        post_mlp = getattr(layer, _POST_MLP_NORM, None)
        sites["hook_mlp_out"] = (post_mlp, "output") if isinstance(post_mlp, nn.Module) else (mlp, "output")
        sites["ln2.hook_normalized"] = (mlp, "input")
        if pre_mlp is not None:
            sites["hook_mlp_in"] = (pre_mlp, "input")
            if attn is not None and not is_parallel(model):
                sites["hook_resid_mid"] = (pre_mlp, "input")
    return sites


def _kind(text: str) -> Optional[str]:
    """The canonical alias kind of ``text`` (``hook_resid_pre``, ``resid_pre``), or None."""
    if text in ALIAS_KINDS:
        return text
    if f"hook_{text}" in ALIAS_KINDS:
        return f"hook_{text}"
    return None


def resolve_site(model: nn.Module, name: str) -> HookSite:
    """The :class:`HookSite` of hook point ``name`` on ``model``.

    Raises HookPointError (a ValueError) naming what exists on ``model`` when the name is unknown.
    """
    match = _ALIAS_RE.match(name)
    if match is not None:
        layers = decoder_layers(model)
        index, kind = int(match.group(1)), _kind(match.group(2))
        if kind is None or index >= len(layers):
            raise _unknown(model, name)
        sites = _block_sites(model, layers[index])
        if kind not in sites:
            raise _unknown(model, name, missing_kind=kind)
        module, port = sites[kind]
        residual_of = layers[index] if kind == "hook_resid_mid" else None
        return HookSite(name, module, port, index, residual_of)
    match = _PATH_RE.match(name)
    if match is not None:
        path, port = match.groups()
        module = dict(model.named_modules()).get(path)
        if module is not None and path:
            return HookSite(name, module, port, _layer_of(model, module))
    raise _unknown(model, name)


def _layer_of(model: nn.Module, module: nn.Module) -> Optional[int]:
    for i, layer in enumerate(decoder_layers(model)):
        if module is layer or any(module is m for m in layer.modules()):
            return i
    return None


def hook_points(model: nn.Module, module_paths: bool = False) -> list[str]:
    """The alias names valid on ``model``, layer by layer (with ``module_paths``: also every ``path:input`` and
    ``path:output`` of its submodules)."""
    names = []
    for i, layer in enumerate(decoder_layers(model)):
        sites = _block_sites(model, layer)
        names.extend(f"blocks.{i}.{kind}" for kind in ALIAS_KINDS if kind in sites)
    if module_paths:
        names.extend(f"{p}:{port}" for p, _ in model.named_modules() if p for port in ("input", "output"))
    return names


def _unknown(model: nn.Module, name: str, missing_kind: Optional[str] = None) -> HookPointError:
    """One line: what is wrong with ``name``, what exists on ``model`` (patterns, not every name), a safe hint."""
    import difflib

    layers = decoder_layers(model)
    n = len(layers)
    kinds = [k for k in ALIAS_KINDS if k in _block_sites(model, layers[0])]
    arch = type(model).__name__
    mlp_path = next((p for p, m in model.named_modules() if m is child(layers[n - 1], _MLP_NAMES)), None)
    match = _ALIAS_RE.match(name)
    hint = ""
    if missing_kind is not None:
        why = " (attention and MLP run in parallel: no resid_mid)" if missing_kind == "hook_resid_mid" else ""
        problem = f"{arch} blocks have no {missing_kind}{why}"
    elif match is not None and _kind(match.group(2)) is not None:
        problem = f"no layer {match.group(1)}"
    elif match is not None:
        problem = f"unknown kind {match.group(2)!r}"
        same = [k for k in kinds if k.lower() == match.group(2).strip().lower()]  # the same place, other case
        hint = f" (did you mean 'blocks.{match.group(1)}.{same[0]}'?)" if same else ""
    else:
        paths = [p for p, _ in model.named_modules() if p]
        base, _, port = name.rpartition(":") if ":" in name else (name, "", "")
        if base in paths:  # the module exists: which side is read cannot be guessed (input and output differ)
            problem = f"a module path needs a port: '{base}:input' or '{base}:output'"
        else:
            problem = "not a blocks.L alias or a module PATH:input|output"
            # Only a path with the same layer numbers and port is offered (a typo, never a neighbouring place).
            close = [p for p in difflib.get_close_matches(base, paths, n=3, cutoff=0.75)
                     if re.findall(r"\d+", p) == re.findall(r"\d+", base)]
            if close and port in ("input", "output"):
                hint = f" (did you mean '{close[0]}:{port}'?)"
    example = f"blocks.{n - 1}.hook_mlp_out" + (f", {mlp_path}:input" if mlp_path else "")
    hooks = ",".join(k[len("hook_"):] for k in kinds if k.startswith("hook_"))
    lns = ",".join(k[2] for k in kinds if k.startswith("ln"))
    layers_ = f"blocks.{{0..{n - 1}}}"
    return HookPointError(f"unknown hook point {name!r} for {arch}: {problem}{hint}. Valid: "
                          f"{layers_}.hook_{{{hooks}}}, {layers_}.ln{{{lns}}}.hook_normalized or PATH:input|output, "
                          f"e.g. {example}")
