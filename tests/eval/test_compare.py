"""`slimlm compare`: choosing runs from the registry, deltas and their direction, the table."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from slimlm.errors import SlimlmError
from slimlm.eval.compare import compare_runs, render_table, resolve_runs
from slimlm.runs import get_run, record

MiB = 2**20
PPL = "perplexity:python-docs"
CAPS = "tasks/capitals.yaml"


def systems(decode: float | None = None, size_mib: float | None = None, ttft_s: float | None = None, **extra) -> dict:
    out = dict(extra)
    if decode is not None:
        out["decode_tps"] = {"median": decode, "min": decode - 1, "max": decode + 1}
    if size_mib is not None:
        out["size_bytes"] = int(size_mib * MiB)
    if ttft_s is not None:
        out["ttft_s"] = {"median": ttft_s, "min": ttft_s, "max": ttft_s}
    return out


def eval_run(db, model, task=PPL, quality=None, primary="perplexity", hib=False, sys=None) -> int:
    metrics = {"task": task, "kind": "x", "quality": quality or {"perplexity": 20.0}, "primary": primary,
               "higher_is_better": hib, "examples": 10, "systems": sys or {}}
    return record(command="eval", model=model, params={"task": task}, metrics=metrics, db=db)


def test_resolve_by_id_and_by_model_newest_eval_wins(tmp_path):
    db = tmp_path / "runs.db"
    a_old = eval_run(db, "m-a")
    b = eval_run(db, "m-b")
    a_new = eval_run(db, "m-a")
    record(command="bench", model="m-a", metrics={"systems": {}}, db=db)  # newer, but not an eval
    assert [r.id for r in resolve_runs([str(b), "m-a"], db=db)] == [b, a_new]
    assert [r.id for r in resolve_runs([f"#{a_old}", str(a_old)], db=db)] == [a_old]  # "#id" too; no duplicates
    only_bench = record(command="bench", model="m-c", metrics={"systems": {}}, db=db)
    assert [r.id for r in resolve_runs(["m-c"], db=db)] == [only_bench]  # bench when there is no eval


def test_resolve_by_model_path(tmp_path):
    db, folder = tmp_path / "runs.db", tmp_path / "models" / "mine"
    run_id = eval_run(db, SimpleNamespace(spec="my-model", path=folder))
    other_spelling = str(tmp_path / "models" / "x" / ".." / "mine")
    for sel in ("my-model", str(folder), other_spelling):
        assert [r.id for r in resolve_runs([sel], db=db)] == [run_id]


def test_resolve_errors(tmp_path):
    db = tmp_path / "runs.db"
    with pytest.raises(SlimlmError, match="slimlm eval"):
        resolve_runs([], db=db)  # nothing recorded yet
    eval_run(db, "m-a")
    with pytest.raises(SlimlmError, match=r"no run with id 9999: `slimlm runs`"):
        resolve_runs(["9999"], db=db)
    with pytest.raises(SlimlmError, match="no-such-model"):
        resolve_runs(["no-such-model"], db=db)
    with pytest.raises(SlimlmError):
        compare_runs([])


def test_resolve_default_is_newest_eval_per_model_and_task(tmp_path):
    db = tmp_path / "runs.db"
    old = eval_run(db, "m-a")
    a_caps = eval_run(db, "m-a", task=CAPS, quality={"acc": 0.5}, primary="acc", hib=True)
    b_ppl = eval_run(db, "m-b")
    a_ppl = eval_run(db, "m-a")
    chosen = [r.id for r in resolve_runs([], db=db)]
    assert old not in chosen and sorted(chosen) == sorted([a_caps, b_ppl, a_ppl])
    tasks = [get_run(i, db=db).metrics["task"] for i in chosen]
    assert tasks in ([PPL, PPL, CAPS], [CAPS, PPL, PPL])  # runs of one task side by side


def test_resolve_uses_the_session_registry_by_default():
    run_id = eval_run(None, "m-session-default")
    assert [r.id for r in resolve_runs(["m-session-default"])] == [run_id]


def test_deltas_lower_is_better():
    db = None
    base = eval_run(db, "m-base", quality={"perplexity": 20.0, "nll": 3.0, "tokens": 100},
                    sys=systems(decode=50.0, size_mib=100, ttft_s=0.1, cost_per_1m_tokens_local=0.02,
                                api_cost_per_1m={"api-x": 0.5}))
    good = eval_run(db, "m-good", quality={"perplexity": 15.0, "nll": 2.7, "tokens": 100},
                    sys=systems(decode=60.0, size_mib=50, ttft_s=0.3, cost_per_1m_tokens_local=0.01,
                                api_cost_per_1m={"api-x": 0.6}))
    bad = eval_run(db, "m-bad", quality={"perplexity": 25.0, "nll": 3.3, "tokens": 100},
                   sys=systems(decode=40.0))
    c = compare_runs(resolve_runs([str(base), str(good), str(bad)]))
    assert [col["id"] for col in c.columns] == [base, good, bad]

    ppl = c.row(f"quality:{PPL}:perplexity")
    assert c.rows[0] is ppl and ppl.higher_is_better is False  # the headline metric first
    first, second, third = ppl.cells
    assert first.delta is None and first.verdict is None  # the baseline has no delta
    assert second.delta == pytest.approx(15.0 - 20.0) and second.delta_pct == pytest.approx(-5.0 / 20.0 * 100)
    assert second.verdict == "better" and third.verdict == "worse"
    assert third.delta == pytest.approx(5.0) and third.delta_pct == pytest.approx(25.0)
    assert c.row(f"quality:{PPL}:nll").cells[1].verdict == "better"
    tokens = c.row(f"quality:{PPL}:tokens")
    assert tokens.cells[1].verdict == "same" and tokens.cells[1].delta == 0

    decode = c.row("decode_tps")
    assert [x.value for x in decode.cells] == [50.0, 60.0, 40.0]
    assert decode.cells[1].verdict == "better" and decode.cells[2].verdict == "worse"
    assert decode.cells[1].delta_pct == pytest.approx(20.0)
    size = c.row("size_mib")
    assert size.cells[1].value == pytest.approx(50.0) and size.cells[1].verdict == "better"
    assert size.cells[2].value is None and size.cells[2].delta is None  # the bad run has no size
    ttft = c.row("ttft_ms")
    assert ttft.cells[1].value == pytest.approx(300.0) and ttft.cells[1].delta == pytest.approx(200.0)
    assert ttft.cells[1].verdict == "worse"
    assert c.row("cost_local").cells[1].verdict == "better"
    api = c.row("api:api-x")
    assert api.cells[1].delta == pytest.approx(0.1) and api.cells[1].verdict is None  # a price, not a verdict


def test_deltas_higher_is_better(tmp_path):
    db = tmp_path / "runs.db"
    ids = [eval_run(db, f"m-{i}", task=CAPS, quality={"acc": acc}, primary="acc", hib=True)
           for i, acc in enumerate((0.5, 0.6, 0.4, 0.5))]
    cells = compare_runs(resolve_runs([str(i) for i in ids], db=db)).row(f"quality:{CAPS}:acc").cells
    assert [x.verdict for x in cells] == [None, "better", "worse", "same"]
    assert cells[1].delta == pytest.approx(0.1) and cells[1].delta_pct == pytest.approx(20.0)
    assert cells[2].delta == pytest.approx(-0.1) and cells[2].delta_pct == pytest.approx(-20.0)


def test_runs_on_two_tasks(tmp_path):
    db = tmp_path / "runs.db"
    caps = eval_run(db, "m-a", task=CAPS, quality={"acc": 0.5}, primary="acc", hib=True, sys=systems(decode=10.0))
    p1 = eval_run(db, "m-a", quality={"perplexity": 20.0}, sys=systems(decode=12.0))
    p2 = eval_run(db, "m-b", quality={"perplexity": 10.0})
    c = compare_runs(resolve_runs([str(caps), str(p1), str(p2)], db=db))
    acc, ppl = c.row(f"quality:{CAPS}:acc"), c.row(f"quality:{PPL}:perplexity")
    assert [x.value for x in acc.cells] == [0.5, None, None] and [x.text for x in acc.cells][1:] == ["", ""]
    assert [x.value for x in ppl.cells] == [None, 20.0, 10.0]
    # the first run has no perplexity, so that row's deltas are against the first run that does
    assert ppl.reference == 1 and ppl.cells[1].delta is None
    assert ppl.cells[2].delta == pytest.approx(-10.0) and ppl.cells[2].verdict == "better"
    assert CAPS in acc.label and PPL in ppl.label
    assert c.row("decode_tps").cells[1].verdict == "better" and c.row("decode_tps").cells[2].value is None


def test_runs_without_numbers_and_json(tmp_path):
    db = tmp_path / "runs.db"
    bench = record(command="bench", model="/some/folder/m-bench/", metrics={"systems": {"decode_tps": "n/a"}}, db=db)
    empty = record(command="eval", model="m-empty", metrics={}, db=db)
    c = compare_runs(resolve_runs([str(bench), str(empty)], db=db))
    assert c.rows == [] and c.columns[0]["label"] == f"#{bench} m-bench"
    data = json.loads(json.dumps(compare_runs(resolve_runs([str(bench), str(empty)], db=db)).to_dict()))
    assert data["baseline"] == bench and [col["id"] for col in data["columns"]] == [bench, empty]


def test_to_dict_is_json_and_table_colours(tmp_path):
    db = tmp_path / "runs.db"
    a = eval_run(db, "m-a", quality={"perplexity": 20.0}, sys=systems(decode=50.0, energy_j_per_1k_tokens=8.0,
                                                                       energy_source="measured (RAPL)"))
    b = eval_run(db, "m-b", quality={"perplexity": 10.0}, sys=systems(decode=25.0, energy_j_per_1k_tokens=4.0,
                                                                       energy_source="estimated (CPU time)"))
    c = compare_runs(resolve_runs([str(a), str(b)], db=db))
    data = json.loads(json.dumps(c.to_dict()))
    row = next(r for r in data["rows"] if r["key"] == f"quality:{PPL}:perplexity")
    assert row["cells"][1]["delta"] == pytest.approx(-10.0) and row["cells"][1]["verdict"] == "better"
    energy = c.row("energy_j_per_1k")
    assert "measured" in energy.cells[0].text and "estimated" in energy.cells[1].text

    out = io.StringIO()
    Console(file=out, force_terminal=True, color_system="standard", width=200).print(render_table(c))
    ansi = out.getvalue()
    green, red = "\x1b[32m", "\x1b[31m"
    assert re.search(re.escape(green) + r"-10\.0 \(-50\.0%\)", ansi)  # perplexity fell: better
    assert re.search(re.escape(red) + r"-25\.0 \(-50\.0%\)", ansi)  # decode speed fell: worse
    assert re.search(re.escape(green) + r"-4\.00 \(-50\.0%\)", ansi)  # energy fell: better
