"""Training data: chat templates, label masks, packing, the held-out split, and errors that
name the file and line (each bad-line case is in tests/data/test_records.py, where the records are
read). The tokenizer is conftest's tiny byte-level BPE with a ChatML template."""

from __future__ import annotations

import json

import pytest

from slimlm.errors import SlimlmError
from slimlm.train.data import IGNORE, collate, encode_chat, load_data, pack, split

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Eleven."}]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def learned(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])


def test_chat_uses_the_template_and_learns_only_assistant_turns(tok):
    ex = encode_chat(tok, CHAT)
    assert ex["input_ids"] == tok.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    # each answer and its end-of-turn marker, so the model learns to stop; nothing of the prompts
    assert learned(tok, ex) == "Seven.<|im_end|>\nEleven.<|im_end|>\n"
    assert encode_chat(tok, CHAT, train_on_prompt=True)["labels"] == ex["input_ids"]


def test_pairs_are_one_user_and_one_assistant_turn(tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(5)])
    data = load_data(path, tok, eval_fraction=0)
    chat = [{"role": "user", "content": "Q0"}, {"role": "assistant", "content": "A0"}]
    assert data.kind == "instruction" and not data.packed
    assert data.train[0] == encode_chat(tok, chat)
    assert learned(tok, data.train[0]) == "A0<|im_end|>\n"


def test_without_a_chat_template_pairs_are_plain_text(tok):
    from copy import deepcopy

    plain = deepcopy(tok)
    plain.chat_template = None
    ex = encode_chat(plain, [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}])
    assert ex["input_ids"][-1] == tok.eos_token_id and learned(tok, ex) == "4<|im_end|>"
    with pytest.raises(SlimlmError, match="no chat template"):
        encode_chat(plain, CHAT)


def test_packing_keeps_every_token_and_its_label():
    examples = [{"input_ids": list(range(n * 10, n * 10 + 7)),
                 "labels": [IGNORE] * 3 + list(range(n * 10 + 3, n * 10 + 7))} for n in range(5)]
    blocks = pack(examples, 8)
    assert [len(b["input_ids"]) for b in blocks] == [8, 8, 8, 8, 3]
    assert sum((b["input_ids"] for b in blocks), []) == sum((e["input_ids"] for e in examples), [])
    assert sum((b["labels"] for b in blocks), []) == sum((e["labels"] for e in examples), [])


def test_packed_instruction_data_and_plain_text(tok, tmp_path):
    rows = [{"messages": CHAT}] * 6 + [{"text": "plain text is learned whole"}]
    data = load_data(write_jsonl(tmp_path / "mix.jsonl", rows), tok, seq_len=16, eval_fraction=0, pack_examples=True)
    assert data.packed and all(len(b["input_ids"]) == 16 for b in data.train[:-1])
    assert any(lab == IGNORE for b in data.train for lab in b["labels"])  # the masks survive packing

    (tmp_path / "book.txt").write_text("Once upon a time. " * 200)
    text = load_data(tmp_path / "book.txt", tok, seq_len=32, eval_fraction=0.25, seed=1)
    assert text.kind == "text" and text.packed and text.eval
    assert all(b["labels"] == b["input_ids"] and len(b["input_ids"]) <= 32 for b in text.train + text.eval)
    docs = load_data("python-docs", tok, seq_len=256, eval_fraction=0.05)
    assert docs.kind == "text" and len(docs.train) > 500 and len(docs.eval) > 20


def test_held_out_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, held = split(items, 0.2, seed=3)
    assert (train, held) == split(items, 0.2, seed=3) and held != split(items, 0.2, seed=4)[1]
    assert len(held) == 20 and sorted(train + held) == items
    assert split(items[:3], 0.01, seed=0)[1]  # a small set still holds one out
    assert split(items, 0, seed=0) == (items, [])


def test_truncation_and_examples_left_with_nothing_to_learn(tok, tmp_path):
    long_prompt = {"prompt": "word " * 80, "completion": "ok"}
    rows = [{"prompt": "hi", "completion": "a long answer " * 20}, long_prompt]
    data = load_data(write_jsonl(tmp_path / "t.jsonl", rows), tok, seq_len=24, eval_fraction=0)
    assert data.truncated == 2 and data.dropped == 1 and len(data.train) == 1
    assert len(data.train[0]["input_ids"]) == 24
    with pytest.raises(SlimlmError, match="raise --seq-len"):
        load_data(write_jsonl(tmp_path / "u.jsonl", [long_prompt]), tok, seq_len=24)


def test_empty_missing_and_skipped(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SlimlmError, match="empty.jsonl: no usable records"):
        load_data(tmp_path / "empty.jsonl", tok)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(SlimlmError, match="empty.txt: the file is empty"):
        load_data(tmp_path / "empty.txt", tok)
    with pytest.raises(SlimlmError, match="no such file"):
        load_data(tmp_path / "nope.jsonl", tok)
    rows = ["{oops", {"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    path = write_jsonl(tmp_path / "some.jsonl", rows)
    data = load_data(path, tok, skip_bad_lines=True, eval_fraction=0)
    assert len(data.train) == 2 and data.skipped == [f"{path}:1: not valid JSON (Expecting property name enclosed in "
                                                     "double quotes)"]


def test_collate_pads_right_and_masks_padding():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "index": 4}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["index"].tolist() == [4, -1]
