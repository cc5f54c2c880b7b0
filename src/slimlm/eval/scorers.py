"""Scorers for generation tasks: does a model's answer match the reference(s)?

Each scorer maps (prediction, references) to a number in [0, 1]; a task's score is the mean,
and an example with several references takes its best match. The normalisation for exact match
and token F1 is the one of the SQuAD evaluation script (lower case, no punctuation, no English
articles, single spaces), which lm-evaluation-harness and most papers use too.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

from slimlm.errors import SlimlmError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    """The normalised reference occurs in the normalised prediction (whole words)."""
    ref = normalize(reference)
    return float(bool(ref) and f" {ref} " in f" {normalize(prediction)} ")


def regex(prediction: str, reference: str) -> float:
    """The reference is a regular expression searched for in the raw prediction."""
    try:
        return float(re.search(reference, prediction) is not None)
    except re.error as exc:
        raise SlimlmError(f"the reference {reference!r} is not a valid regular expression ({exc}): "
                          "fix it, or use another scorer") from None


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "contains": contains, "regex": regex, "token_f1": token_f1}


def get_scorer(name: str) -> Callable[[str, str], float]:
    if name not in SCORERS:
        raise SlimlmError(f"unknown scorer '{name}': choose from {', '.join(SCORERS)}")
    return SCORERS[name]


def extract(prediction: str, pattern: str | None) -> str:
    """The part of an answer to score: the first group (or whole match) of `pattern`, or the
    answer itself when there is no pattern. No match gives an empty answer (scored as wrong)."""
    if not pattern:
        return prediction
    found = re.search(pattern, prediction)
    if not found:
        return ""
    return (found.group(1) or "") if found.groups() else found.group(0)


def best_score(scorer: Callable[[str, str], float], prediction: str, references: list[str]) -> float:
    return max(scorer(prediction, ref) for ref in references)
