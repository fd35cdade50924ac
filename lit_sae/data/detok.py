"""A context's text as the tokenizer decodes it, cut at its tokens: what the feature browser shows per token.

Decoding each token alone is wrong for byte-level BPE (GPT-2, SmolLM2, Llama 3): a multi-byte character (emoji, CJK,
accented letters) is often split over two or three tokens, and each part alone decodes to U+FFFD. Here the tokens
are decoded incrementally, the way streaming generation detokenizes (transformers' ``TextStreamer``, vLLM): a token
whose bytes do not finish a character gets an empty piece, and the token that finishes it carries the whole
character. A few previous tokens are decoded with each new one, so tokenizers whose decoding of a token depends on
its neighbours (SentencePiece's leading space) are cut where their full decoding puts the text. Joining the pieces
gives exactly ``tokenizer.decode(ids)``; where a tokenizer's decoding is not incremental (its full decoding is not
the concatenation of its prefix decodings), a slower exact fallback diffs the decodings of successive prefixes.
"""

from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["token_pieces", "decode_runs"]

REPLACEMENT = "\ufffd"


def _decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    if callable(tokenizer) and not hasattr(tokenizer, "decode"):
        return tokenizer
    return lambda ids: tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token of ``ids`` contributes to ``tokenizer.decode(ids)``; ``"".join`` of the result equals it.

    Args:
        tokenizer: a transformers tokenizer (``decode``), or a function ``list[int] -> str``.
        ids: one context's token ids.

    Returns:
        One string per token: empty for a token whose bytes only start a character that a later token finishes.
    """
    decode = _decoder(tokenizer)
    ids = [int(i) for i in ids]
    full = decode(ids)
    pieces = _incremental(decode, ids)
    if "".join(pieces) != full:
        pieces = _prefix_diffs(decode, ids)
    return pieces


def _incremental(decode, ids: list[int]) -> list[str]:
    """vLLM-style: decode ids[prefix:j+1] against ids[prefix:read]; emit the new text once it ends in a whole char."""
    pieces: list[str] = []
    prefix = read = 0
    for j in range(len(ids)):
        before = decode(ids[prefix:read])
        now = decode(ids[prefix:j + 1])
        if len(now) > len(before) and not now.endswith(REPLACEMENT) and now.startswith(before):
            pieces.append(now[len(before):])
            prefix, read = read, j + 1
        elif j == len(ids) - 1:  # the context ends inside a character: the decoding's own U+FFFD goes here
            pieces.append(now[len(before):] if now.startswith(before) else now)
        else:
            pieces.append("")
    return pieces


def _prefix_diffs(decode, ids: list[int]) -> list[str]:
    """Exact for any tokenizer: each token gets what its prefix decoding adds to the previous prefix's (a prefix
    ending inside a character waits for the token that finishes it); the last token absorbs any rewrite."""
    pieces, emitted = [], ""
    for j in range(len(ids)):
        now = decode(ids[:j + 1])
        if j < len(ids) - 1 and (now.endswith(REPLACEMENT) or not now.startswith(emitted)):
            pieces.append("")
            continue
        if not now.startswith(emitted):  # the last token rewrote earlier text: start over from the full decoding
            return [""] * (len(ids) - 1) + [now] if ids else []
        pieces.append(now[len(emitted):])
        emitted = now
    return pieces


def decode_runs(tokenizer, tokens: Sequence[int | None]) -> list[str | None]:
    """A pattern of tokens with wildcards (None), decoded run by run: each maximal run of consecutive token ids is
    decoded together (so a character split over tokens shows whole); a wildcard stays None."""
    decode = _decoder(tokenizer)
    out: list[str | None] = []
    run: list[int] = []
    for t in list(tokens) + [None]:
        if t is None:
            if run:
                out.append(decode(run))
                run = []
            out.append(None)
        else:
            run.append(int(t))
    return out[:-1]
