"""Training data: records (read by slimlm.data) to token ids with label masks.

The records come from slimlm.data.read_records: chat conversations, prompt/completion pairs
and plain text. Instruction data goes through the model's own chat template, because a model
fine-tuned on a format it will not see at inference time learns the wrong thing. Only assistant
turns are learned (labels are -100 elsewhere) unless `train_on_prompt`: the prompt is given at
inference time, and spending capacity on predicting it teaches the model to write questions.
The held-out split is made before packing, so no held-out text leaks into a training block.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from slimlm.data import JsonlReport, read_records, record_scores
from slimlm.errors import SlimlmError

IGNORE = -100  # the label value torch's cross_entropy and transformers' losses skip


@dataclass
class TrainData:
    """Tokenized examples: each a dict with `input_ids` and `labels` (lists of ints, same length)."""

    train: list[dict]
    eval: list[dict]
    kind: str  # "instruction" (some labels masked) or "text" (every token is learned)
    source: str
    seq_len: int
    packed: bool
    truncated: int = 0  # examples cut to seq_len
    dropped: int = 0  # examples with nothing left to learn after the cut
    skipped: list[str] = field(default_factory=list)  # bad lines skipped with skip_bad_lines

    @property
    def train_tokens(self) -> int:
        return sum(len(ex["input_ids"]) for ex in self.train)

    def fingerprint(self) -> str:
        return fingerprint(self.train)


def fingerprint(examples: list[dict]) -> str:
    """A hash of the token ids and labels: a checkpoint remembers it, so resuming on different data is refused."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(array("i", ex["input_ids"]).tobytes())
        digest.update(array("i", ex.get("labels", ex["input_ids"])).tobytes())
    return digest.hexdigest()[:16]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(tokenizer, messages: list[dict], train_on_prompt: bool = False) -> dict:
    """Token ids of a conversation in the model's chat template; labels only on assistant turns.

    Each assistant turn's span is found by rendering the conversation up to it (with the
    generation prompt) and through it: the difference is what the model must produce, the
    end-of-turn marker included, so it learns to stop. Character offsets from one tokenization
    of the whole text map the spans to tokens, so no boundary is tokenized differently.
    """
    if not getattr(tokenizer, "chat_template", None):
        if len(messages) == 2 and [m["role"] for m in messages] == ["user", "assistant"]:
            return _encode_plain_pair(tokenizer, messages[0]["content"], messages[1]["content"], train_on_prompt)
        raise SlimlmError("the model has no chat template: give prompt/completion pairs or plain text instead")
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            raise SlimlmError("the model's chat template rewrites earlier turns (e.g. drops reasoning), so "
                              "assistant turns cannot be located: train on one assistant turn per record")
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        return {"input_ids": ids, "labels": list(ids)}
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE
              for tok, (a, _b) in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids, "labels": labels}


def _encode_plain_pair(tokenizer, prompt: str, completion: str, train_on_prompt: bool) -> dict:
    """Prompt then completion then end-of-sequence, for models without a chat template."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": p + c, "labels": (p if train_on_prompt else [IGNORE] * len(p)) + c}


def encode_text(tokenizer, text: str) -> dict:
    """A document as the model would see it in pretraining: its usual specials, then end-of-sequence."""
    ids = list(tokenizer(text, verbose=False)["input_ids"])  # long documents are cut into blocks later
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return {"input_ids": ids, "labels": list(ids)}


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate examples and cut fixed-length blocks (labels travel with their tokens).

    Fixed-length blocks waste no compute on padding. The last, shorter block is kept when it
    has anything to learn, so a small data set is not silently emptied.
    """
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    blocks = [{"input_ids": ids[i:i + seq_len], "labels": labels[i:i + seq_len]} for i in range(0, len(ids), seq_len)]
    return [b for b in blocks if len(b["input_ids"]) > 1 and _learnable(b)]


def _learnable(ex: dict) -> bool:
    """True if some label after the first position is a real token (position 0 predicts nothing)."""
    return any(t != IGNORE for t in ex["labels"][1:])


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out split: the same seed and data always hold out the same items."""
    if not 0 <= eval_fraction < 1:
        raise SlimlmError(f"eval fraction {eval_fraction} must be at least 0 and below 1")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(items) * eval_fraction)
    if eval_fraction > 0 and len(items) >= 2:
        n_eval = min(max(n_eval, 1), len(items) - 1)
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def parse_curriculum(spec: str) -> tuple[str, bool]:
    """'KEY' (ascending: the highest scores last) or 'KEY:desc' -> (key, descending)."""
    key, _, order = spec.partition(":")
    if not key or order not in ("", "asc", "desc"):
        raise SlimlmError(f"curriculum {spec!r}: give a score name, optionally with :asc or :desc (edu_score, "
                          "perplexity:desc)")
    return key, order == "desc"


def curriculum_order(scores: list[float], spec: str, buckets: int, seed: int) -> list[int]:
    """Indices in curriculum order: sorted by score (stable), or, with `buckets`, cut into that many
    equal buckets of increasing score, each shuffled (seeded): a coarse order that still mixes
    examples of about the same score."""
    _, descending = parse_curriculum(spec)
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=descending)
    if buckets > 1:
        rng, size = random.Random(seed), -(-len(order) // buckets)
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        for chunk in chunks:
            rng.shuffle(chunk)
        order = [i for chunk in chunks for i in chunk]
    return order


def load_data(source: str | Path, tokenizer, seq_len: int = 512, eval_fraction: float = 0.1, seed: int = 0,
              train_on_prompt: bool = False, pack_examples: bool | None = None,
              skip_bad_lines: bool = False, curriculum: str | None = None, buckets: int = 0) -> TrainData:
    """Read, tokenize, split and (for text, or when asked) pack training data.

    pack_examples: None packs plain text and leaves instruction examples one per row (padded
    per batch); True packs instruction examples too, keeping their label masks.
    curriculum: a score each record carries (`metadata.KEY`, as `slimlm curate` writes it, e.g.
    edu_score, or perplexity under a teacher); the training examples are ordered by it
    (curriculum_order) instead of shuffled, the held-out split staying random.
    """
    if seq_len < 2:
        raise SlimlmError(f"sequence length {seq_len} is too short: use at least 2 tokens (512 is typical)")
    report = JsonlReport()
    records = read_records(source, skip_bad_lines=skip_bad_lines, report=report)
    scores = record_scores(source, parse_curriculum(curriculum)[0], skip_bad_lines) if curriculum else None
    kind = "text" if all(isinstance(r, str) for r in records) else "instruction"
    if kind == "text":  # split blocks, since a .txt file is a single document
        if scores is not None:  # documents in curriculum order, then packed: the blocks follow it
            records = [records[i] for i in curriculum_order(scores, curriculum, buckets, seed)]
        blocks = pack([encode_text(tokenizer, r) for r in records], seq_len)
        train, held = split(blocks, eval_fraction, seed)
        return TrainData(train, held, kind, str(source), seq_len, True, skipped=report.skipped)
    examples = []
    for number, r in enumerate(records, start=1):
        try:
            examples.append(encode_chat(tokenizer, r, train_on_prompt) if isinstance(r, list)
                            else encode_text(tokenizer, r))
        except SlimlmError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template's own error (e.g. "roles must alternate")
            raise SlimlmError(f"{source}: record {number}: the model's chat template rejects it: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    truncated = sum(len(ex["input_ids"]) > seq_len for ex in examples)
    if not pack_examples:
        examples = [{k: v[:seq_len] for k, v in ex.items()} for ex in examples]
    learnable = [i for i, ex in enumerate(examples) if _learnable(ex)]
    kept = [examples[i] for i in learnable]
    if not kept:
        raise SlimlmError(f"{source}: no example has an answer token within the first {seq_len} tokens: "
                          "raise --seq-len")
    train, held = split(kept, eval_fraction, seed)
    if scores is not None:  # the same split, then the training examples in curriculum order
        train_idx, _ = split(learnable, eval_fraction, seed)
        train = [examples[train_idx[i]] for i in curriculum_order([scores[j] for j in train_idx], curriculum,
                                                                   buckets, seed)]
    if pack_examples:
        train, held = pack(train, seq_len), pack(held, seq_len)
    return TrainData(train, held, kind, str(source), seq_len, bool(pack_examples),
                     truncated=0 if pack_examples else truncated, dropped=len(examples) - len(kept),
                     skipped=report.skipped)


def collate(examples: list[dict]) -> dict:
    """Right-pad a list of examples into a batch: input_ids, attention_mask, labels (-100 on padding;
    input_ids when an example has none) and index (each example's position in its data set, so a
    loss can look up per-example data such as cached teacher outputs)."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    batch = {"input_ids": torch.zeros(len(examples), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(examples), width, dtype=torch.long),
             "labels": torch.full((len(examples), width), IGNORE, dtype=torch.long),
             "index": torch.tensor([ex.get("index", -1) for ex in examples], dtype=torch.long)}
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        batch["input_ids"][row, :n] = torch.tensor(ex["input_ids"])
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = torch.tensor(ex.get("labels", ex["input_ids"]))
    return batch
