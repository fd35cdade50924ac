"""The explainer, detection and fuzzing prompts as chat messages, and the parsers of their replies.

The prompts follow the structure of EleutherAI/delphi's (``delphi/explainers/default/prompts.py``,
``delphi/scorers/classifier/prompts/{detection,fuzz}_prompt.py``), reworded, with one short worked example each:

- **Explainer**: the examples one per line, the tokens where the latent is active marked ``<<like this>>``
  (activation above ``highlight`` x the example's max; consecutive marked tokens share one pair of marks), each
  followed by an ``Activations:`` line of (token, activation scaled to 0-10 by the latent's max among the shown
  examples, rounded up, as delphi's ``normalize_activations``); the reply's last line is ``[EXPLANATION]: ...``.
- **Detection**: the explanation and ``n`` unmarked examples; the reply is a Python list of ``n`` 0/1 (1: the
  latent fires somewhere in the example).
- **Fuzzing**: the explanation and ``n`` examples with some tokens marked; the reply is a list of ``n`` 0/1 (1: the
  marked tokens are exactly what the explanation describes).

Parsing follows delphi's ``Classifier._parse``: the first ``[...]`` in the reply, read as JSON, must hold ``n``
values of 0 or 1; otherwise the batch is *unparsed* (counted, never guessed). With log-probabilities, the
probability of each answer is P(1) / (P(0) + P(1)) over the top alternatives of each answer token (delphi's
``_parse_logprobs``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Callable, Sequence

from lit_sae.autointerp.examples import Example

__all__ = ["mark", "explainer_messages", "parse_explanation", "detection_messages", "fuzz_messages",
           "parse_predictions", "answer_probabilities"]

Messages = list[dict]

EXPLAINER_SYSTEM = """You study patterns in text. You are shown text examples in which some tokens are marked between \
<<double angle brackets>>. The marked tokens are where one hidden unit of a language model is active. After each \
example, an "Activations:" line lists the marked tokens with how strongly the unit is active on them (0 to 10).

Find what the marked tokens, and the text just before them, have in common. Guidelines:
- Write one short, specific description of the pattern, not a list of guesses.
- Do not mention the << >> marks.
- The last line of your reply must be the description, in the form [EXPLANATION]: description"""

EXPLAINER_SHOT_USER = """Example 1: the results were<< surprisingly>> good
Activations: (" surprisingly", 9)
Example 2: he was<< remarkably>> calm about it
Activations: (" remarkably", 10)
Example 3: an<< unusually>> warm winter
Activations: (" unusually", 7)"""

EXPLAINER_SHOT_REPLY = "[EXPLANATION]: Adverbs of degree that express surprise, before an adjective."

SCORER_SYSTEM = """You are a careful linguist. You are given a description of a pattern in text, such as "male \
pronouns" or "the word 'def' at the start of a Python function", and several numbered text examples."""

DETECTION_TASK = """For each example in order, answer 1 if the pattern occurs in the example and 0 if it does not. \
Reply with a Python list of 0s and 1s, one per example, and nothing else."""

FUZZ_TASK = """In each example some tokens are marked between << and >>. For each example in order, answer 1 if \
every marked token is an instance of the pattern and 0 if any marked token is not. Reply with a Python list of 0s \
and 1s, one per example, and nothing else."""

# The worked example of the scorer prompts has as many examples as the real question (a small model that copies
# the worked answer still answers in the right length; its copied answers then score at chance, as they should).
SHOT_PATTERN = 'the word "guys" in "you guys".'
SHOT_EXAMPLES = [  # (unmarked, marked correctly or wrongly, right answer for detection, right answer for fuzzing)
    ("I hope you guys like it", "I hope you<< guys>> like it", 1, 1),
    ("the weather was cold all week", "the<< weather>> was cold all week", 0, 0),
    ("thanks, you guys are great", "thanks, you guys are<< great>>", 1, 0),
    ("are you guys coming tonight", "are you<< guys>> coming tonight", 1, 1),
    ("she opened the door slowly", "she opened<< the>> door slowly", 0, 0),
]


def _shot(n: int, marked: bool) -> tuple[str, str]:
    """(question, answer) of the worked example with ``n`` examples."""
    rows = [SHOT_EXAMPLES[i % len(SHOT_EXAMPLES)] for i in range(n)]
    body = "\n".join(f"Example {i}: {r[1] if marked else r[0]}" for i, r in enumerate(rows))
    return f"Pattern: {SHOT_PATTERN}\n\n{body}", str([r[3] if marked else r[2] for r in rows])


def mark(str_tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The text of ``str_tokens`` with each run of marked tokens between ``<<`` and ``>>``."""
    out, inside = [], False
    for tok, m in zip(str_tokens, marked):
        if m and not inside:
            out.append("<<")
        elif not m and inside:
            out.append(">>")
        inside = m
        out.append(tok)
    if inside:
        out.append(">>")
    return "".join(out)


def _active(ex: Example, highlight: float) -> list[bool]:
    top = ex.max_act
    return [a > highlight * top and a > 0 for a in ex.acts]


def explainer_messages(examples: list[Example], decode: Callable[[int], str], highlight: float = 0.3) -> Messages:
    """The explainer's chat: system, one worked example, then ``examples`` (``decode``: token id -> text)."""
    scale = max((e.max_act for e in examples), default=0.0) or 1.0
    lines = []
    for i, ex in enumerate(examples, 1):
        toks = [decode(t) for t in ex.tokens]
        act = _active(ex, highlight)
        lines.append(f"Example {i}: {mark(toks, act)}")
        pairs = [f"({json.dumps(tok, ensure_ascii=False)}, {min(10, math.ceil(a * 10 / scale))})"
                 for tok, a, m in zip(toks, ex.acts, act) if m][:10]
        lines.append("Activations: " + ", ".join(pairs))
    return [{"role": "system", "content": EXPLAINER_SYSTEM},
            {"role": "user", "content": EXPLAINER_SHOT_USER},
            {"role": "assistant", "content": EXPLAINER_SHOT_REPLY},
            {"role": "user", "content": "\n".join(lines)}]


def parse_explanation(text: str) -> tuple[str, bool]:
    """(explanation, parsed): the text after the last ``[EXPLANATION]:`` (delphi's format); when the tag is missing,
    the reply's first non-empty line with parsed=False (small models often drop the tag)."""
    found = re.findall(r"\[EXPLANATION\]\s*:\s*(.+)", text)
    if found:
        return found[-1].strip(), True
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first[:300], False


def _scorer_messages(task: str, marked: bool, explanation: str, texts: list[str]) -> Messages:
    body = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts))
    question, answer = _shot(len(texts), marked)
    return [{"role": "system", "content": f"{SCORER_SYSTEM}\n\n{task}"},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"Pattern: {explanation}\n\n{body}"}]


def detection_messages(explanation: str, texts: list[str]) -> Messages:
    """The detection chat for unmarked example ``texts``."""
    return _scorer_messages(DETECTION_TASK, False, explanation, texts)


def fuzz_messages(explanation: str, texts: list[str]) -> Messages:
    """The fuzzing chat for marked example ``texts``."""
    return _scorer_messages(FUZZ_TASK, True, explanation, texts)


def parse_predictions(text: str, n: int) -> list[bool] | None:
    """The ``n`` 0/1 answers of the first ``[...]`` in ``text``, or None when it is missing or malformed."""
    m = re.search(r"\[[^\[\]]*\]", text or "")
    if m is None:
        return None
    try:
        values = json.loads(m.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(values, list) or len(values) != n or any(v not in (0, 1) or isinstance(v, float)
                                                               for v in values):
        return None
    return [bool(v) for v in values]


def answer_probabilities(logprobs: list | None, n: int) -> list[float] | None:
    """P(1) of each of the ``n`` answers from the reply's per-token top log-probabilities, or None.

    ``logprobs``: [[token, [[alternative, logprob], ...]], ...] for the generated tokens; an answer token is one whose
    text holds "0" or "1"; its probability is P(1) / (P(0) + P(1)) summed over alternatives holding "1" / "0"."""
    if not logprobs:
        return None
    out = []
    for token, alts in logprobs:
        if "0" not in token and "1" not in token:
            continue
        p0 = sum(math.exp(lp) for t, lp in alts if "0" in t)
        p1 = sum(math.exp(lp) for t, lp in alts if "1" in t and "0" not in t)
        out.append(p1 / (p0 + p1) if p0 + p1 > 0 else 0.0)
    return out[:n] if len(out) >= n else None
