"""Routing: which requests the small local model answers, and which go to the large model.

Three kinds of policy share one `Decision(route, reason, score)`:
- fixed (`LocalPolicy`, `LargePolicy`): the two ends every router is measured against;
- `CascadePolicy`: answer locally first and escalate when the small model was unsure of its
  own answer, read from its token log-probs. Costs a local answer on every request, needs no
  training;
- `LearnedRouter`: decide from the prompt alone, before generating: a logistic regression
  predicts "the small model is good enough" from the prompt's features (router_features.py:
  MiniLM's token vectors averaged, the default and well under a millisecond; MiniLM in context;
  or hashed n-grams), which keeps the router's cost far below that of the generation it saves.

A router is judged by its quality-vs-escalation curve (`router_curve`): escalating prompts in
order of the router's doubt, how fast does quality climb from all-local to all-large? A
router that knows nothing is the straight line between the two (`random_curve`); the area
under the curve (`curve_auc`) is the one number to compare routers by.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.serve.router_features import (
    DEFAULT_FEATURES,
    ENCODER,
    FEATURES,
    feature_dim,
    featurize,
    hashed_ngrams,
)

FORMAT = "slimlm-router/1"
METRICS = ("mean", "min", "entropy")


@dataclass
class Decision:
    route: str  # "local" | "large"
    reason: str
    score: float | None = None  # the policy's confidence that the small model is good enough


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


# -- the learned router -------------------------------------------------------------------------
def _logistic(z):
    """1 / (1 + e^-z), written so that a large |z| cannot overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _threshold_for(scores: np.ndarray, k: int) -> float:
    """A threshold that escalates (score < t) exactly the k lowest of `scores` (ties aside)."""
    s = np.sort(scores)
    if k <= 0:
        return float(s[0])
    if k >= len(s):
        return float(np.nextafter(s[-1], np.inf))
    return float((s[k - 1] + s[k]) / 2)


class LearnedRouter(Policy):
    """Logistic regression on prompt features (router_features.FEATURES); label 1 means the
    small model is good enough. Escalates when P(good enough) < threshold."""

    name = "learned"

    def __init__(self, threshold: float = 0.5, C: float | None = None, features: str = DEFAULT_FEATURES) -> None:
        if features not in FEATURES:
            raise SlimlmError(f"unknown router features '{features}': choose one of {', '.join(FEATURES)}")
        # sparse n-gram rows have many small entries and want weaker regularization than embeddings
        self.threshold, self.features = float(threshold), features
        self.C = C if C is not None else (10.0 if features == "hashing" else 1.0)
        self.coef: np.ndarray | None = None
        self.intercept = 0.0
        self.meta: dict = {}

    def fit(self, prompts: Sequence[str], labels: Sequence[int]) -> LearnedRouter:
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(labels, dtype=int)
        if len(prompts) != len(y):
            raise SlimlmError(f"{len(prompts)} prompts but {len(y)} labels: give one label per prompt")
        if len(set(y.tolist())) < 2:
            raise SlimlmError(f"all {len(y)} training prompts have label {y[0] if len(y) else '?'}: nothing to "
                              "learn; add prompts the small model gets wrong (and right), or use a fixed policy")
        x = featurize(prompts, self.features)
        model = LogisticRegression(C=self.C, max_iter=2000).fit(x, y)
        self.coef, self.intercept = model.coef_[0].astype(np.float64), float(model.intercept_[0])
        self.meta.update(trained_on=len(y), positive_share=float(y.mean()), features=self.features,
                         dim=int(x.shape[1]),
                         train_accuracy=float(((self._proba(x) >= 0.5) == y).mean()), created=time.time())
        return self

    def _proba(self, x: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise SlimlmError("the router is not trained: fit it, or load one written by `slimlm router train`")
        return _logistic(np.asarray(x @ self.coef, dtype=np.float64).ravel() + self.intercept)

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        """P(the small model is good enough) for each prompt."""
        return self._proba(featurize(prompts, self.features))

    def decide(self, prompt: str) -> Decision:
        if self.features == "hashing" and self.coef is not None:  # one prompt: the lean path
            p = float(_logistic(hashed_ngrams().dot(prompt, self.coef) + self.intercept))
        else:
            p = float(self.score([prompt])[0])
        if p < self.threshold:
            return Decision("large", f"learned router: P(small is good enough) {p:.2f} < {self.threshold:.2f}", p)
        return Decision("local", f"learned router: P(small is good enough) {p:.2f} >= {self.threshold:.2f}", p)

    def calibrate(self, prompts: Sequence[str], labels: Sequence[int], target_escalation: float | None = None,
                  target_quality: float | None = None) -> float:
        """Set the threshold on held-out prompts (not the training ones) for a target share of
        requests sent to the large model, or for the least escalation whose quality reaches
        `target_quality`. Quality here is the share of prompts answered as well as the large
        model would: escalated ones, and local ones labelled 1."""
        if (target_escalation is None) == (target_quality is None):
            raise SlimlmError("give exactly one of a target escalation rate and a target quality")
        target = target_escalation if target_escalation is not None else target_quality
        if not 0.0 <= target <= 1.0:
            raise SlimlmError(f"the calibration target must be between 0 and 1 (got {target})")
        y = np.asarray(labels, dtype=int)
        scores = self.score(prompts)
        order = np.argsort(scores, kind="stable")
        n = len(y)
        if target_escalation is not None:
            k = int(round(target_escalation * n))
        else:  # quality after escalating the k most doubtful: k + local prompts labelled 1
            quality = (np.arange(n + 1) + np.concatenate([[y.sum()], y.sum() - np.cumsum(y[order])])) / n
            k = int(np.argmax(quality >= target_quality - 1e-12))
        self.threshold = _threshold_for(scores, k)
        escalated = scores < self.threshold
        self.meta["calibration"] = {
            "target_escalation": target_escalation, "target_quality": target_quality, "prompts": n,
            "escalation": float(escalated.mean()), "quality": float(np.where(escalated, 1, y).mean())}
        return self.threshold

    def save(self, path: str | Path) -> Path:
        """One JSON file (weights, threshold, metadata): nothing is unpickled on load, so a
        router file from elsewhere cannot run code, and it loads under any scikit-learn."""
        from slimlm.paths import atomic_write_text

        if self.coef is None:
            raise SlimlmError("the router is not trained: fit it before saving")
        file = _router_file(path)
        data = {"format": FORMAT, "policy": self.name, "features": self.features, "threshold": self.threshold,
                "intercept": self.intercept, "meta": self.meta}
        if self.features != "hashing":  # 384 MiniLM dimensions
            data.update(encoder=ENCODER, coef=self.coef.tolist())
        else:  # 65,536 weights, nonzero only for n-grams seen in training: stored sparse
            nonzero = np.flatnonzero(self.coef)
            data.update(dim=len(self.coef), coef_index=nonzero.tolist(), coef_value=self.coef[nonzero].tolist())
        atomic_write_text(file, json.dumps(data, indent=1))
        return file

    @classmethod
    def load(cls, path: str | Path) -> LearnedRouter:
        file = _router_file(path)
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SlimlmError(f"cannot read a router from {file} ({type(exc).__name__}): pass a file written by "
                              "`slimlm router train`") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SlimlmError(f"{file} is not a slimlm router ({FORMAT}): retrain it with `slimlm router train`")
        features = data.get("features", "minilm")  # routers written before "hashing" existed were MiniLM's
        if features not in FEATURES:
            raise SlimlmError(f"{file} uses router features '{features}' this slimlm does not know: retrain it with "
                              "`slimlm router train`")
        dim = feature_dim(features)
        if features != "hashing":
            coef = data.get("coef")
            ok = isinstance(coef, list) and len(coef) == dim
        else:
            index, value = data.get("coef_index"), data.get("coef_value")
            ok = data.get("dim") == dim and isinstance(index, list) and isinstance(value, list) and \
                len(index) == len(value) and all(0 <= i < dim for i in index)
            if ok:
                coef = np.zeros(dim)
                coef[np.asarray(index, dtype=np.int64)] = value
        if not ok:
            raise SlimlmError(f"{file} holds weights for other features than {features}'s {dim} dimensions: retrain "
                              "it with `slimlm router train`")
        router = cls(threshold=data["threshold"], features=features)
        router.coef, router.intercept = np.asarray(coef, dtype=np.float64), float(data["intercept"])
        router.meta = data.get("meta", {})
        return router


def _router_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.suffix == ".json" else path / "router.json"


# -- training labels and evaluation -------------------------------------------------------------
@dataclass
class LabelSet:
    """Per prompt: both answers, their quality, and the label (1: the small one is good enough)."""

    prompts: list[str]
    labels: list[int] = field(default_factory=list)
    small_quality: list[float] = field(default_factory=list)
    large_quality: list[float] = field(default_factory=list)
    small_answers: list[str] = field(default_factory=list)
    large_answers: list[str] = field(default_factory=list)


def build_labels(prompts: Sequence[str], references: Sequence[str | list[str] | None] | None,
                 small_answer_fn: Callable[[str], str], large_answer_fn: Callable[[str], str],
                 scorer: Callable[[str, str], float] | str = "token_f1", margin: float = 0.0,
                 agreement: float = 0.5) -> LabelSet:
    """Answer every prompt with both models and label it.

    With a reference, both answers are scored against it (best of several references) and the
    small model is good enough when it scores at least the large one's score minus `margin`:
    where both fail, sending the prompt up would buy nothing. Without a reference the large
    answer stands in for one (its quality counts as 1) and the label is whether the small
    answer agrees with it to at least `agreement`.
    """
    from slimlm.eval.scorers import best_score, get_scorer

    score = get_scorer(scorer) if isinstance(scorer, str) else scorer
    references = list(references) if references is not None else [None] * len(prompts)
    if len(references) != len(prompts):
        raise SlimlmError(f"{len(prompts)} prompts but {len(references)} references: give one per prompt (or None)")
    out = LabelSet(prompts=list(prompts))
    for prompt, ref in zip(prompts, references):
        small, large = small_answer_fn(prompt), large_answer_fn(prompt)
        refs = [r for r in ([ref] if isinstance(ref, str) else ref or []) if r and r.strip()]
        if refs:
            sq, lq = best_score(score, small, refs), best_score(score, large, refs)
            label = sq >= lq - margin
        else:
            sq, lq = score(small, large), 1.0
            label = sq >= agreement
        out.labels.append(int(label))
        out.small_quality.append(float(sq))
        out.large_quality.append(float(lq))
        out.small_answers.append(small)
        out.large_answers.append(large)
    return out


def router_curve(policy_scores: Sequence[float], small_quality: Sequence[float],
                 large_quality: Sequence[float]) -> list[tuple[float, float]]:
    """(escalation rate, mean quality) as prompts are sent up in order of increasing score
    (the policy's confidence in the small model). Points are taken only between distinct
    scores, so the straight segments across a run of ties are exactly the expected curve
    under random tie-breaking: a constant policy gives the random-router line."""
    s, sq, lq = (np.asarray(a, dtype=np.float64) for a in (policy_scores, small_quality, large_quality))
    if not (len(s) == len(sq) == len(lq)) or len(s) == 0:
        raise SlimlmError("router_curve needs one score, small quality and large quality per prompt")
    n = len(s)
    order = np.argsort(s, kind="stable")
    gained = np.concatenate([[0.0], np.cumsum((lq - sq)[order])])
    ranked = s[order]
    ks = [0] + [k for k in range(1, n) if ranked[k] != ranked[k - 1]] + [n]
    return [(k / n, float((sq.sum() + gained[k]) / n)) for k in ks]


def random_curve(small_quality: Sequence[float], large_quality: Sequence[float],
                 points: int = 11) -> list[tuple[float, float]]:
    """The expected curve of a router that escalates at random: a straight line between the
    all-local and the all-large quality."""
    lo, hi = float(np.mean(small_quality)), float(np.mean(large_quality))
    return [(r, lo + r * (hi - lo)) for r in np.linspace(0.0, 1.0, points).tolist()]


def curve_auc(curve: Sequence[tuple[float, float]]) -> float:
    """Area under a quality-vs-escalation curve (trapezoid rule over escalation 0..1)."""
    rates, quality = zip(*curve)
    return float(np.trapezoid(quality, rates))


def quality_at(curve: Sequence[tuple[float, float]], rates: Sequence[float]) -> list[float]:
    """The curve read at the given escalation rates (linear between its points)."""
    xs, ys = zip(*curve)
    return np.interp(rates, xs, ys).tolist()
