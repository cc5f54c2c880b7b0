"""slimlm.routing's library calls behind `slimlm router train|eval`, without models: the
train/held-out split and the curves drawn from labelled rows (the end-to-end runs through the
CLI, with tiny models, are in tests/serve/test_router.py)."""

from __future__ import annotations

import json

import pytest

from slimlm.errors import SlimlmError
from slimlm.routing import evaluate_router, policy_curves, router_curve, split_rows


def rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"p{i}", "small_quality": float(i % 2), "large_quality": 1.0,
             "small_logprobs": [-0.1 * (i % 2 + 1), -0.2], "small_top_logprobs": [[-0.1, -3.0], [-0.2, -2.0]]}
            for i in range(n)]


def test_split_marks_each_row_and_is_fixed_by_seed():
    a, b = rows(20), rows(20)
    train, held = split_rows(a, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert train == [r for r in a if r["split"] == "train"] and held == [r for r in a if r["split"] == "holdout"]
    assert [r["prompt"] for r in split_rows(b, 0.25, seed=3)[1]] == [r["prompt"] for r in held]
    assert split_rows(rows(4), 0, seed=0)[1] == []


def test_policy_curves_from_stored_logprobs():
    labelled = rows()
    curves = policy_curves(labelled)
    assert set(curves) == {"cascade:mean", "cascade:min", "cascade:entropy", "oracle", "random"}
    sq, lq = [r["small_quality"] for r in labelled], [r["large_quality"] for r in labelled]
    assert curves["oracle"] == router_curve([s - b for s, b in zip(sq, lq)], sq, lq)
    no_logprobs = [{k: v for k, v in r.items() if not k.startswith("small_") or k == "small_quality"} for r in labelled]
    assert set(policy_curves(no_logprobs)) == {"oracle", "random"}


def test_evaluate_uses_the_held_out_rows_and_needs_answers(tmp_path):
    labelled = rows()
    split_rows(labelled, 0.5, seed=1)
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in labelled))
    result = evaluate_router(path)
    assert result["prompts"] == 4 and result["split"] == "held-out rows"
    assert evaluate_router(path, use_all=True)["prompts"] == 8
    assert result["policies"]["oracle"]["auc"] >= result["policies"]["random"]["auc"] - 1e-9
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello"}\n')
    with pytest.raises(SlimlmError, match="--small and --large"):
        evaluate_router(prompts)
