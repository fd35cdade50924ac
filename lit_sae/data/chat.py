"""Conversations as a text source: JSONL of messages rendered by the tokenizer's chat template.

Each line of the file (or of every ``.jsonl`` file of a folder, sorted by path) is one conversation:
``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}`` (a bare list of
messages is accepted too). Every line is checked when the source is opened, before any model runs: a malformed
one raises ValueError naming ``file:line``, what is wrong and the expected shape. A conversation becomes one
document, ``tokenizer.apply_chat_template(messages, tokenize=False)``: the template's text with its special tokens
(``<|im_start|>``, ``<|im_end|>``, ...) written out, which the tokenizer maps back to their ids. The LM stream
drops rows whose token is a special token (:func:`special_token_ids`), as it drops position 0 (an attention sink
without a BOS): they are the template's scaffolding, not text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from lit_sae.data.text import JSONL_SUFFIXES, TextSource, _permute, jsonl_records

_SHAPE = ('each line must be {"messages": [{"role": "user", "content": "..."}, ...]} (role and content strings, '
          "at least one message)")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.suffix.lower() in JSONL_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"data.source: {path} holds no {'/'.join(JSONL_SUFFIXES)} file of conversations")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"data.source: chat file not found: {path}")


def _messages(record, where: str) -> list[dict]:
    """The validated messages of one JSONL record (ValueError naming ``where`` = file:line)."""
    messages = record.get("messages") if isinstance(record, dict) else record
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"data.source: {where}: no 'messages' list; {_SHAPE}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"data.source: {where}: message {i} is {json.dumps(m)[:80]}, not a role/content pair "
                             f"of strings; {_SHAPE}")
    return messages


def read_conversations(path: str | Path) -> Iterator[list[dict]]:
    """The conversations of a JSONL file or folder, in order (ValueError naming file:line for a malformed line)."""
    for p in _files(Path(path)):
        for line_no, record in jsonl_records(p, "data.source", _SHAPE):
            yield _messages(record, f"{p}:{line_no}")


def chat_source(path: str | Path, tokenizer, shuffle_seed: int | None = None) -> TextSource:
    """A :class:`~lit_sae.data.text.TextSource` of rendered conversations. Checks every line and the tokenizer's
    chat template now (ValueError naming data.source / data.chat); ``shuffle_seed`` permutes the files."""
    count = sum(1 for _ in read_conversations(path))
    if count == 0:
        raise ValueError(f"data.source: {path} holds no conversation; {_SHAPE}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data.chat: the tokenizer ({type(tokenizer).__name__}) has no chat template; use a chat "
                         "model's tokenizer or set data.chat: false for plain text")
    files = _permute(_files(Path(path)), shuffle_seed)

    def documents() -> Iterator[str]:
        for p in files:
            for messages in read_conversations(p):
                yield tokenizer.apply_chat_template(messages, tokenize=False)

    return TextSource(kind="chat", name=str(path), _documents=documents)


def special_token_ids(tokenizer) -> np.ndarray:
    """The ids of the tokenizer's special tokens (int64, sorted): rows of these tokens are dropped."""
    return np.asarray(sorted(set(int(i) for i in tokenizer.all_special_ids)), dtype=np.int64)
