"""Content identity of a harvest's inputs: the LM's weights, its tokenizer and the text source.

A harvest's activations depend on what is behind a name, not on the name: a model folder overwritten by another
checkpoint, a re-tokenized vocabulary or an edited text folder keep their path. Each input is identified here by a
sha256 of its content, recorded in the manifest (``inputs``) when a harvest starts, compared when it resumes
(:func:`lit_sae.data.harvest_state.check_inputs`) and when held-out text is rebuilt from the manifest
(:func:`verify_text`). The hashes are of the loaded content, so they do not depend on the device, file layout or
sharding of a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Optional

from lit_sae.data.manifest import InputsInfo

log = logging.getLogger(__name__)

__all__ = ["changed_inputs", "identify", "tokenizer_sha256", "verify_text", "weights_sha256"]


def weights_sha256(model) -> str:
    """sha256 of ``model.state_dict()`` (names, dtypes, shapes, bytes); about 1 s per GB on one core."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of a Hugging Face tokenizer's content: vocabulary, special tokens, and for fast tokenizers the whole
    serialized pipeline (normalizer, pre-tokenizer, merges, post-processor)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = {"vocab": sorted(tokenizer.get_vocab().items()),
               "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
               "backend": backend.to_str() if backend is not None else None}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def identify(model, tokenizer, text) -> InputsInfo:
    """The identity of a harvest's three inputs (``text``: a :class:`lit_sae.data.text.TextSource`)."""
    return InputsInfo(weights_sha256=weights_sha256(model), tokenizer_sha256=tokenizer_sha256(tokenizer),
                         source_sha256=text.fingerprint())


def changed_inputs(recorded: Optional[InputsInfo], now: InputsInfo) -> list[str]:
    """One phrase per input whose content differs from ``recorded`` (a manifest's ``inputs``); an input the record
    lacks counts as changed (it cannot be shown to be the same)."""
    names = {"weights_sha256": "the model's weights", "tokenizer_sha256": "the tokenizer",
             "source_sha256": "the text source's files"}
    out = []
    for key, what in names.items():
        old, new = getattr(recorded, key, None), getattr(now, key)
        if old != new:
            out.append(f"{what} (sha256 {str(old)[:12]}... recorded, {str(new)[:12]}... now)")
    return out


def verify_text(settings: dict, text, tokenizer=None) -> None:
    """Refuse to rebuild held-out text from a source that is not what the harvest read.

    ``settings``: :func:`lit_sae.eval.report.settings_from_manifest` (its ``inputs``, ``source_sha256`` and
    ``source_documents`` are the harvest's record); ``text``: the reopened :class:`~lit_sae.data.text.TextSource`;
    ``tokenizer``: the one the consumer cuts contexts with. Checked: the source's file fingerprint, the sha256 of
    the documents the harvest consumed (the first ``source_documents`` documents, in the harvest's order), and the
    tokenizer's content.

    Raises:
        ValueError: naming the manifest's source and what differs, with the fix (restore it or harvest again).
    """
    where = settings.get("manifest_path") or "the manifest"
    fix = "restore the source as it was harvested, or harvest again and evaluate on the new shards"
    inputs = settings.get("inputs") or {}
    if tokenizer is not None and inputs.get("tokenizer_sha256"):
        now = tokenizer_sha256(tokenizer)
        if now != inputs["tokenizer_sha256"]:
            raise ValueError(f"{where}: the tokenizer of {settings.get('model')} changed since the harvest (sha256 "
                             f"{inputs['tokenizer_sha256'][:12]}... recorded, {now[:12]}... now): the held-out "
                             f"contexts would not be the harvested ones; {fix}")
    recorded_sha, n_docs = settings.get("source_sha256"), settings.get("source_documents")
    if inputs.get("source_sha256"):
        now = text.fingerprint()
        if now != inputs["source_sha256"]:
            raise ValueError(f"{where}: text source {settings.get('source')!r} changed since the harvest (file "
                             f"sha256 {inputs['source_sha256'][:12]}... recorded, {str(now)[:12]}... now): its "
                             f"test contexts may now be training text; {fix}")
    elif recorded_sha is None or n_docs is None:
        raise ValueError(f"{where}: records no hash of the text source {settings.get('source')!r}, so held-out text "
                         f"rebuilt from it cannot be checked to be what was harvested; {fix}")
    if recorded_sha is not None and n_docs is not None:
        from lit_sae.data.text import ContentHash

        h = ContentHash()
        for i, doc in enumerate(text.documents()):
            if i >= n_docs:
                break
            h.update(doc)
        if h.documents != n_docs or h.hexdigest() != recorded_sha:
            raise ValueError(f"{where}: the first {n_docs} documents of text source {settings.get('source')!r} are "
                             f"not what the harvest read ({h.documents} found, sha256 {h.hexdigest()[:12]}... now, "
                             f"{recorded_sha[:12]}... recorded): its test contexts may now be training text; {fix}")
