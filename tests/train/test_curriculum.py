"""Curriculum: training examples ordered by a score their records carry (as `slimlm curate`
writes it), the held-out split unchanged, and the trainer keeping that order."""

from __future__ import annotations

import json

import pytest

from slimlm.errors import SlimlmError
from slimlm.train.data import curriculum_order, load_data
from tests.conftest import run_cli


def test_curriculum_order_sorts_reverses_and_buckets():
    scores = [3.0, 1.0, 2.0, 5.0, 4.0, 0.0]
    assert curriculum_order(scores, "edu_score", 0, 0) == [5, 1, 2, 0, 4, 3]
    assert curriculum_order(scores, "edu_score:desc", 0, 0) == [3, 4, 0, 2, 1, 5]
    bucketed = curriculum_order(scores, "edu_score", 3, 0)
    assert [sorted(scores[i] for i in bucketed[k:k + 2]) for k in (0, 2, 4)] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(SlimlmError, match="give a score name"):
        curriculum_order(scores, "edu_score:up", 0, 0)


@pytest.fixture()
def scored(tmp_path):
    path = tmp_path / "scored.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}],
             "metadata": {"edu_score": (7 * i) % 20}} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_data_orders_training_examples_and_keeps_the_same_held_out(scored, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    plain = load_data(scored, tok, seq_len=64, eval_fraction=0.2, seed=0)
    ordered = load_data(scored, tok, seq_len=64, eval_fraction=0.2, seed=0, curriculum="edu_score")
    assert ordered.eval == plain.eval
    assert sorted(map(str, ordered.train)) == sorted(map(str, plain.train))

    def score(ex):  # read back from the text: "answer i" -> (7 i) mod 20
        i = int(tok.decode(ex["input_ids"]).split("answer ")[1].split("<")[0])
        return (7 * i) % 20

    assert [score(ex) for ex in ordered.train] == sorted(score(ex) for ex in plain.train)


def test_a_record_without_the_score_is_named(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b", "metadata": {"edu_score": 1}}) + "\n")
    with pytest.raises(SlimlmError, match=r"d.jsonl:1: no score 'edu_score'"):
        load_data(path, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), curriculum="edu_score")


def test_finetune_cli_trains_in_curriculum_order(scored, tiny_models, tmp_path, capfd):
    code, out, err = run_cli(capfd, "finetune", tiny_models("llama"), "--data", scored, "--out", tmp_path / "out",
                             "--max-steps", "2", "--curriculum", "edu_score", "--curriculum-buckets", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["train"]["steps"] == 2
    code, _, err = run_cli(capfd, "finetune", tiny_models("llama"), "--data", scored, "--out", tmp_path / "o2",
                           "--curriculum-buckets", "2")
    assert code == 1 and "--curriculum-buckets needs --curriculum" in err


def test_trainer_keeps_the_data_order_when_shuffle_is_off(scored, tiny_models, tmp_path):
    from dataclasses import replace

    from slimlm.models.loading import load_torch
    from slimlm.train.core import TrainConfig, Trainer

    model, tok = load_torch(tiny_models("llama"))
    data = load_data(scored, tok, seq_len=64, eval_fraction=0.2, seed=0, curriculum="edu_score")
    trainer = Trainer(model, replace(TrainConfig(out=str(tmp_path / "t")), shuffle=False, batch_size=4), data)
    seen = [int(i) for batch in trainer.loader for i in batch["index"]]
    assert seen == list(range(len(data.train)))
