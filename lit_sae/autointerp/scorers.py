"""Detection and fuzzing: the held-out samples each scorer shows, and the per-latent scores of the answers.

Definitions (EleutherAI/delphi ``delphi/scorers/classifier/{detection,fuzz,sample}.py``; Paulo et al. 2024, s3):

- **Detection**: the held-out activating examples and the non-activating examples, unmarked, shuffled; the judge
  says for each whether the explanation's pattern occurs. Positive = activating.
- **Fuzzing** (``fuzz_type="default"``, delphi's default): the held-out activating examples with their active tokens
  marked (activation above ``highlight`` x the example's max) are positives; the non-activating examples with
  ``n_wrong`` random tokens marked are negatives, ``n_wrong`` = the mean number of firing tokens per activating
  example, rounded up (delphi's ``mean_n_activations_ceil``). ``fuzz_type="active"``: the negatives are the same
  activating examples with ``n_wrong`` non-firing tokens marked instead (harder: the context is right, the marks
  are not).
- Samples are shuffled (seeded) and asked ``n_shown`` per prompt (delphi's run default 5).

Scores per latent and scorer, over the samples whose batch parsed: ``accuracy``, ``precision``, ``recall``, ``f1``
(positive class = activating / correctly marked), ``auroc`` from the answer probabilities when the backend gave
log-probabilities and both classes are present (torchmetrics' binary AUROC), and the counts ``n`` (samples
scored), ``n_pos``, ``n_unparsed``. A latent with no parsed sample has scores None.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from lit_sae.autointerp.examples import Example, LatentExamples
from lit_sae.autointerp.prompts import mark

__all__ = ["Sample", "detection_samples", "fuzz_samples", "batches", "score"]


@dataclass
class Sample:
    """One example as a scorer shows it: ``text`` (marked for fuzzing), ``positive`` the right answer, ``marked``
    per-token marks (None for detection), ``example`` the source window; after scoring, ``prediction``
    (None: unparsed) and ``probability``."""

    text: str
    positive: bool
    example: Example
    marked: Optional[list[bool]] = None
    prediction: Optional[bool] = None
    probability: Optional[float] = None

    def to_json(self) -> dict:
        return {"ctx": self.example.ctx, "start": self.example.start, "tokens": self.example.tokens,
                "acts": [round(a, 4) for a in self.example.acts], "activating": self.example.activating,
                "quantile": self.example.quantile, "marked": self.marked, "positive": self.positive,
                "prediction": self.prediction, "probability": self.probability,
                "correct": None if self.prediction is None else self.prediction == self.positive}


def _firing(ex: Example, highlight: float) -> list[bool]:
    top = ex.max_act
    return [a > 0 and a >= highlight * top for a in ex.acts]


def detection_samples(le: LatentExamples, decode: Callable[[int], str]) -> list[Sample]:
    """Unmarked held-out activating (positive) and non-activating (negative) examples."""
    return [Sample("".join(decode(t) for t in ex.tokens), ex.activating, ex) for ex in le.test + le.negative]


def fuzz_samples(le: LatentExamples, decode: Callable[[int], str], rng: random.Random, highlight: float = 0.3,
                 fuzz_type: Literal["default", "active"] = "default") -> list[Sample]:
    """Correctly marked held-out activating examples (positive) and wrongly marked ones (negative, see the module
    docstring)."""
    if not le.test:
        return []
    n_wrong = math.ceil(sum(sum(a > 0 for a in ex.acts) for ex in le.test) / len(le.test))
    out = []
    for ex in le.test:
        m = _firing(ex, highlight)
        out.append(Sample(_marked_text(ex, m, decode), True, ex, m))
    for ex in (le.negative if fuzz_type == "default" else le.test):
        quiet = [i for i, a in enumerate(ex.acts) if a <= highlight * ex.max_act or ex.max_act == 0]
        pick = set(rng.sample(quiet, min(n_wrong, len(quiet))))
        if not pick:
            continue
        m = [i in pick for i in range(len(ex.tokens))]
        out.append(Sample(_marked_text(ex, m, decode), False, ex, m))
    return out


def _marked_text(ex: Example, marked: list[bool], decode: Callable[[int], str]) -> str:
    return mark([decode(t) for t in ex.tokens], marked)


def batches(samples: list[Sample], n_shown: int, rng: random.Random) -> list[list[Sample]]:
    """The samples shuffled by ``rng`` and cut into prompts of ``n_shown``."""
    order = list(samples)
    rng.shuffle(order)
    return [order[a:a + n_shown] for a in range(0, len(order), max(1, n_shown))]


def score(samples: list[Sample]) -> dict:
    """Per-latent scores of answered samples (see the module docstring for the fields)."""
    done = [s for s in samples if s.prediction is not None]
    n, n_pos = len(done), sum(s.positive for s in done)
    out = {"n": n, "n_pos": n_pos, "n_unparsed": len(samples) - n, "accuracy": None, "precision": None,
           "recall": None, "f1": None, "auroc": None}
    if n == 0:
        return out
    tp = sum(s.positive and s.prediction for s in done)
    fp = sum((not s.positive) and s.prediction for s in done)
    fn = sum(s.positive and not s.prediction for s in done)
    out["accuracy"] = sum(s.prediction == s.positive for s in done) / n
    out["precision"] = tp / (tp + fp) if tp + fp else 0.0
    out["recall"] = tp / (tp + fn) if tp + fn else None
    p, r = out["precision"], out["recall"]
    out["f1"] = (2 * p * r / (p + r) if p + r else 0.0) if r is not None else None
    probs = [s for s in done if s.probability is not None]
    if len(probs) == n and 0 < n_pos < n:
        import torch
        from torchmetrics.functional.classification import binary_auroc

        out["auroc"] = float(binary_auroc(torch.tensor([s.probability for s in probs]),
                                          torch.tensor([int(s.positive) for s in probs])))
    return out
