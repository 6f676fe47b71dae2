"""Per-document scores and their aggregates, defined as lm-eval-harness and the SQuAD script define them.

Multiple choice (`choice_scores`): `acc` takes the choice with the highest summed log-likelihood; `acc_norm`
divides each log-likelihood by the number of characters of the choice string (without the space that joins it
to the context), as lm-eval's `ConfigurableTask.process_results` does. Ties go to the first choice (numpy's
argmax). Generation: `exact_match` and `f1` compare SQuAD-normalised text (lowercase, no punctuation, no
articles, single spaces) against the best of several references; `contains` is the recall metric of the
Based/Hymba recall tasks: some reference occurs in the generation, ignoring case.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

PUNCTUATION = frozenset(string.punctuation)

def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (as numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: values[i])


def choice_scores(loglikelihoods: Sequence[float], gold: int, choice_lengths: Sequence[int]) -> dict[str, float]:
    """`acc` and `acc_norm` of one multiple-choice question, plus the two predictions."""
    pred = argmax(loglikelihoods)
    pred_norm = argmax([ll / length for ll, length in zip(loglikelihoods, choice_lengths)])
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred, "pred_norm": pred_norm}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:  # SQuAD v2's rule: two empty answers agree, one empty answer scores 0
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 of the prediction against its best-matching answer."""
    return max(_f1(prediction, a) for a in answers)


def contains(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if some answer occurs in the prediction, ignoring case (Based's `contains_score`)."""
    return float(any(re.search(re.escape(a), prediction, re.IGNORECASE) for a in answers))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean with the sample standard deviation (lm-eval's `mean_stderr`); None below 2."""
    n = len(values)
    if n < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def perplexity(loglikelihoods: Sequence[float]) -> float:
    """exp of the negative mean log-likelihood per document (lm-eval's `perplexity` aggregation for LAMBADA)."""
    return math.exp(-mean(loglikelihoods))
