"""The learned router: decide from the prompt alone, before generating.

A logistic regression predicts "the small model is good enough" from the prompt's features
(features.py: MiniLM's token vectors averaged, the default and well under a millisecond; MiniLM
in context; or hashed n-grams), which keeps the router's cost far below that of the generation
it saves. It is fitted on labelled prompts (labels.py), its threshold calibrated on held-out
ones, and written to one JSON file that `slimlm serve --policy learned` loads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.routing.features import DEFAULT_FEATURES, ENCODER, FEATURES, feature_dim, featurize, hashed_ngrams
from slimlm.routing.policies import Decision, Policy

FORMAT = "slimlm-router/1"


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
    """Logistic regression on prompt features (features.FEATURES); label 1 means the
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
