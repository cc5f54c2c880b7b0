"""Offline teacher cache: run the teacher over the training sequences once, keep its top-k per token.

Distillation re-reads the teacher's distribution every epoch; running a big teacher beside the
student every step costs its forward pass each time and its memory all the time. Storing the full
distribution is out of the question (150k vocab x 2 bytes = 300 KB per token), but the top k carry
almost all of the mass: at k = 32, ids as int32 and log-probs as float16 take 32 * (4 + 2) = 192
bytes per token. `losses.TopK` consumes exactly this (tail handled by renormalizing over the top k).

Layout of a cache folder:
  index.json                  format, k, vocab_size, tokenizer hash, teacher, sequence count,
                              token count, bytes per token, shard list, complete flag
  shard-00000.safetensors     sequences [0, S): "ids" [tokens, k] int32, "logprobs" [tokens, k]
                              float16 (log-softmax over the real vocabulary, descending), "offsets"
                              [n + 1] int64 (sequence j of the shard is rows offsets[j]:offsets[j+1])
Row t of a sequence is the teacher's distribution for the token *after* position t (the logits at
t), for every position including the last, so it lines up with the student's logits.

safetensors because it is a plain header plus raw arrays, read lazily by slice (no pickle, no
loading a whole shard to get one sequence). Shards are written atomically (temporary file, then
rename) and skipped when already present, so an interrupted build resumes where it stopped;
index.json records a hash of the sequences and the teacher's tokenizer, so a cache is never
resumed or read against different data or a different vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError

__all__ = ["build_teacher_cache", "TeacherCache", "tokenizer_hash"]

FORMAT = "slimlm-teacher-cache/1"
INDEX = "index.json"


def tokenizer_hash(tokenizer) -> str:
    """A short hash of the token -> id map and special tokens: equal hashes, same vocabulary."""
    data = json.dumps([sorted(tokenizer.get_vocab().items()), sorted(tokenizer.all_special_tokens)])
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def as_ids(seq) -> np.ndarray:
    ids = seq["input_ids"] if isinstance(seq, dict) else seq
    ids = np.asarray(ids.tolist() if hasattr(ids, "tolist") else ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise SlimlmError("a training sequence is empty: drop empty examples before caching the teacher")
    return ids


def sequences_hash(seqs: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for s in seqs:
        digest.update(len(s).to_bytes(8, "little"))
        digest.update(s.astype("<i8").tobytes())
    return digest.hexdigest()[:16]


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def build_teacher_cache(teacher, sequences, out: str | Path, *, k: int = 32, tokenizer=None,
                        vocab_size: int | None = None, batch_size: int = 4, shard_sequences: int = 256,
                        force: bool = False, progress: bool = True) -> dict:
    """Cache the teacher's top-k over `sequences` (lists of token ids, or dicts with "input_ids")
    in the folder `out`; returns the index. `teacher` is a model reference (loaded with
    load_torch) or a loaded causal LM with `tokenizer` given. An unfinished cache of the same
    teacher and sequences is resumed; anything else already at `out` needs `force`.
    Memory: one batch of logits [batch_size, longest sequence, vocab] in float32."""
    import torch

    from slimlm.progress import progress_bar

    out = Path(out)
    if isinstance(teacher, (str, Path)):
        from slimlm.models.loading import load_torch

        name, (model, tok) = str(teacher), load_torch(teacher)
        tokenizer = tokenizer or tok
    else:
        name, model = getattr(getattr(teacher, "config", None), "_name_or_path", "") or type(teacher).__name__, teacher
        if tokenizer is None:
            raise SlimlmError("a loaded teacher needs its tokenizer: pass tokenizer=")
    seqs = [as_ids(s) for s in sequences]
    if not seqs:
        raise SlimlmError("no sequences to run the teacher on")
    vocab = vocab_size or len(tokenizer)
    model_vocab = model.get_output_embeddings().weight.shape[0]
    if not 0 < k <= vocab or vocab > model_vocab:
        raise SlimlmError(f"k = {k} must be in [1, {vocab}] and the vocabulary ({vocab}) no larger than the "
                          f"teacher's output ({model_vocab})")
    too_big = max(int(s.max()) for s in seqs)
    if too_big >= vocab:
        raise SlimlmError(f"token id {too_big} is outside the teacher's vocabulary of {vocab}: the sequences were "
                          "tokenized with another tokenizer")
    plan = {"format": FORMAT, "k": k, "vocab_size": vocab, "model_vocab_size": model_vocab,
            "tokenizer_hash": tokenizer_hash(tokenizer), "teacher": name, "num_sequences": len(seqs),
            "num_tokens": int(sum(len(s) for s in seqs)), "shard_sequences": shard_sequences,
            "sequences_hash": sequences_hash(seqs), "ids_dtype": "int32", "logprobs_dtype": "float16"}
    _prepare(out, plan, force)
    n_shards = -(-len(seqs) // shard_sequences)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    bar = progress_bar("teacher top-k", len(seqs)) if progress else contextlib.nullcontext(lambda n=1: None)
    with bar as advance, torch.no_grad():
        for shard in range(n_shards):
            path = out / _shard_name(shard)
            chunk = seqs[shard * shard_sequences:(shard + 1) * shard_sequences]
            if path.exists():  # written completely by an earlier run (files appear only by rename)
                advance(len(chunk))
                continue
            ids_rows, lp_rows = [], []
            for at in range(0, len(chunk), batch_size):
                batch = chunk[at:at + batch_size]
                width = max(len(s) for s in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, s in enumerate(batch):  # right padding: causal positions before it are untouched
                    input_ids[row, :len(s)] = torch.from_numpy(s)
                    mask[row, :len(s)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                top = torch.log_softmax(logits[..., :vocab].float(), dim=-1).topk(k, dim=-1)
                for row, s in enumerate(batch):
                    ids_rows.append(top.indices[row, :len(s)].to(torch.int32).cpu().numpy())
                    lp_rows.append(top.values[row, :len(s)].to(torch.float16).cpu().numpy())
                advance(len(batch))
            _write_shard(path, ids_rows, lp_rows, shard * shard_sequences)
    return _finish(out, plan, n_shards)


def _prepare(out: Path, plan: dict, force: bool) -> None:
    index = out / INDEX
    if out.exists():
        old = json.loads(index.read_text()) if index.exists() else None
        same = old is not None and all(old.get(key) == value for key, value in plan.items() if key != "teacher")
        if not same or old.get("complete"):
            if not force:
                what = "a finished cache" if same else "something else (other sequences, teacher or k)"
                raise SlimlmError(f"{out} already holds {what}: choose another path or pass force=True")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    index.write_text(json.dumps(dict(plan, complete=False), indent=2))


def _write_shard(path: Path, ids_rows, lp_rows, first: int) -> None:
    from safetensors.numpy import save_file

    offsets = np.concatenate([[0], np.cumsum([len(r) for r in ids_rows])]).astype(np.int64)
    tensors = {"ids": np.ascontiguousarray(np.concatenate(ids_rows)),
               "logprobs": np.ascontiguousarray(np.concatenate(lp_rows)), "offsets": offsets}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"first_sequence": str(first), "num_sequences": str(len(ids_rows))})
    os.replace(tmp, path)


def _finish(out: Path, plan: dict, n_shards: int) -> dict:
    from safetensors import safe_open

    shards, first = [], 0
    for i in range(n_shards):
        path = out / _shard_name(i)
        with safe_open(str(path), framework="numpy") as f:
            offsets = f.get_tensor("offsets")
        shards.append({"file": path.name, "first_sequence": first, "num_sequences": len(offsets) - 1,
                       "num_tokens": int(offsets[-1]), "bytes": path.stat().st_size})
        first += len(offsets) - 1
    total = sum(s["bytes"] for s in shards)
    index = dict(plan, shards=shards, bytes=total, bytes_per_token=total / plan["num_tokens"],
                 payload_bytes_per_token=plan["k"] * (4 + 2), complete=True)
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out / INDEX)
    return index


class TeacherCache:
    """Read access to a finished cache: `TeacherCache.open(path).get(i) -> (ids, logprobs)`."""

    def __init__(self, path: Path, index: dict):
        self.path, self.index = Path(path), index
        self.k, self.vocab_size = index["k"], index["vocab_size"]
        self.tokenizer_hash, self.num_tokens = index["tokenizer_hash"], index["num_tokens"]
        self.bytes_per_token = index["bytes_per_token"]
        self._starts = [s["first_sequence"] for s in index["shards"]]
        self._open: dict = {}

    @classmethod
    def open(cls, path: str | Path) -> TeacherCache:
        path = Path(path)
        try:
            index = json.loads((path / INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise SlimlmError(f"{path} is not a teacher cache (no readable {INDEX}): build it first") from exc
        if index.get("format") != FORMAT:
            raise SlimlmError(f"{path}: unknown cache format {index.get('format')!r}, expected {FORMAT}")
        if not index.get("complete"):
            raise SlimlmError(f"{path} is an unfinished teacher cache: run the build again to resume it")
        return cls(path, index)

    def __len__(self) -> int:
        return self.index["num_sequences"]

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a student whose vocabulary is not the teacher's."""
        if tokenizer_hash(tokenizer) != self.tokenizer_hash:
            raise SlimlmError(f"{self.path} was made with another tokenizer: token-level distillation needs "
                              "one vocabulary; rebuild the cache or use sequence-level distillation")

    def _shard(self, i: int):
        from bisect import bisect_right

        from safetensors import safe_open

        s = bisect_right(self._starts, i) - 1
        if s not in self._open:
            f = safe_open(str(self.path / self.index["shards"][s]["file"]), framework="numpy")
            self._open[s] = (f, f.get_tensor("offsets"))
        return self._open[s], i - self._starts[s]

    def get(self, seq_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [len, k], logprobs float16 [len, k]) of sequence `seq_index`."""
        if not 0 <= seq_index < len(self):
            raise IndexError(f"sequence {seq_index} of a cache of {len(self)}")
        (f, offsets), j = self._shard(seq_index)
        a, b = int(offsets[j]), int(offsets[j + 1])
        return f.get_slice("ids")[a:b], f.get_slice("logprobs")[a:b]

    def topk(self, seq_index: int):
        """The same as torch tensors in the form losses.TopK takes (ids int64, log-probs float32)."""
        import torch

        from slimlm.train.losses import TopK

        ids, lp = self.get(seq_index)
        return TopK(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(lp.astype(np.float32)))
