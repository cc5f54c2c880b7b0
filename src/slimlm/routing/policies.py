"""Routing policies: which requests the small local model answers, and which go to the large model.

Three kinds of policy share one `Decision(route, reason, score)`:
- fixed (`LocalPolicy`, `LargePolicy`): the two ends every router is measured against;
- `CascadePolicy`: answer locally first and escalate when the small model was unsure of its
  own answer, read from its token log-probs. Costs a local answer on every request, needs no
  training;
- `LearnedRouter` (learned.py): decide from the prompt alone, before generating.

These are what the server asks at request time (serve/hybrid.py) and what `slimlm router eval`
draws curves of; they live below serve/ so that training and evaluating a router needs no server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from slimlm.errors import SlimlmError

METRICS = ("mean", "min", "entropy")


@dataclass
class Decision:
    """Where a request runs, and why: the one Decision of routing. Policies here set the first
    three fields; the server (serve/hybrid.py, which imports it as serve.types.Decision) adds
    what its privacy guard found and how the escalation is counted."""

    route: str  # "local" | "large"; server records also say "local-fallback" (the large model failed)
    reason: str  # recorded, and sent in the x-slimlm-reason header
    score: float | None = None  # the policy's confidence that the small model is good enough
    privacy: str | None = None  # what the privacy guard found, e.g. "redact: email" (kinds, never values)
    redact: bool = False  # send placeholders upstream and restore the values in the answer
    label: str | None = None  # the escalation metric's label (default: reason); keep it to a few values


class Policy:
    """The interface: `decide(prompt)` before generating; `confidence(...)` after (cascade)."""

    name = "policy"
    needs_logprobs = False

    def decide(self, prompt: str) -> Decision:
        raise NotImplementedError

    def confidence(self, token_logprobs: Sequence[float],
                   top_logprobs: Sequence[Sequence[float]] | None = None) -> float:
        raise SlimlmError(f"the '{self.name}' policy decides from the prompt alone: use a cascade policy "
                          "to route on the local answer's log-probs")


class LocalPolicy(Policy):
    name = "local"

    def decide(self, prompt: str) -> Decision:
        return Decision("local", "policy 'local': every request stays on this machine")


class LargePolicy(Policy):
    name = "large"

    def decide(self, prompt: str) -> Decision:
        return Decision("large", "policy 'large': every request goes to the large model")


def _logprob(x) -> float:
    return float(x["logprob"] if isinstance(x, dict) else x)  # floats, or OpenAI's {"token", "logprob"}


class CascadePolicy(Policy):
    """Escalate when the local answer's confidence over its first `first_n` tokens is below
    `threshold`. Metrics: "mean" log-prob, "min" log-prob (one doubtful token is enough), or
    "entropy": minus the mean entropy of the top-k alternatives, renormalised over the k given
    (the API only reports the top k, so this is the entropy of that truncated distribution)."""

    name = "cascade"
    needs_logprobs = True

    def __init__(self, threshold: float, metric: str = "mean", first_n: int | None = 16) -> None:
        if metric not in METRICS:
            raise SlimlmError(f"unknown cascade metric '{metric}': choose one of {', '.join(METRICS)}")
        self.threshold, self.metric, self.first_n = float(threshold), metric, first_n

    def confidence(self, token_logprobs, top_logprobs=None) -> float:
        n = self.first_n or None
        lps = [_logprob(x) for x in list(token_logprobs)[:n]]
        if not lps:
            return -math.inf  # no answer is no evidence: escalate
        if self.metric == "mean":
            return float(np.mean(lps))
        if self.metric == "min":
            return float(np.min(lps))
        if not top_logprobs:
            raise SlimlmError("the entropy metric needs top log-probs: ask the model for top_logprobs, or use "
                              "metric mean or min")
        entropies = []
        for alternatives in list(top_logprobs)[:n]:
            p = np.exp([_logprob(a) for a in alternatives])
            p = p / p.sum()
            entropies.append(float(-(p * np.log(np.clip(p, 1e-300, None))).sum()))
        return -float(np.mean(entropies))

    def should_escalate(self, token_logprobs, top_logprobs=None) -> Decision:
        c = self.confidence(token_logprobs, top_logprobs)
        if c < self.threshold:
            return Decision("large", f"cascade: {self.metric} confidence {c:.3f} < {self.threshold:.3f}", c)
        return Decision("local", f"cascade: {self.metric} confidence {c:.3f} >= {self.threshold:.3f}", c)

    def decide(self, prompt: str) -> Decision:
        return Decision("local", "cascade: answer locally first, escalate if the answer is unsure")
