"""Run registry and manifests."""

from __future__ import annotations

import json
import sqlite3

from slimlm.models.reference import resolve
from slimlm.runs import get_run, lineage, list_runs, read_manifest, record, write_manifest


def test_record_list_show(tmp_path, tiny_models):
    db = tmp_path / "runs.db"
    ref = resolve(str(tiny_models("llama")))
    first = record("eval", ref, params={"task": "ppl"}, metrics={"ppl": 12.5}, db=db)
    second = record("bench", ref, metrics={"decode_tps": 30.0}, db=db)
    assert second > first
    assert [r.id for r in list_runs(db=db)] == [second, first]
    assert [r.command for r in list_runs(command="eval", db=db)] == ["eval"]
    run = get_run(first, db=db)
    assert run.params == {"task": "ppl"} and run.metrics == {"ppl": 12.5}
    assert run.model_path == str(ref.path) and "torch" in run.versions and run.machine["model"]
    # the database is plain SQLite that other tools can read
    rows = sqlite3.connect(db).execute("SELECT command FROM runs ORDER BY id").fetchall()
    assert rows == [("eval",), ("bench",)]


def test_lineage_follows_parents(tmp_path):
    base, child, grandchild = (tmp_path / n for n in ("base", "child", "grandchild"))
    for d in (base, child, grandchild):
        d.mkdir()
    write_manifest(child, parent=base, operation="finetune", params={"rank": 8})
    write_manifest(grandchild, parent=child, operation="quantize", params={"bits": 4})
    chain = lineage(grandchild)
    assert [s["operation"] for s in chain] == ["quantize", "finetune", "source"]
    assert chain[0]["params"] == {"bits": 4}
    assert read_manifest(grandchild)["parent"]["path"] == str(child)


def test_lineage_stops_on_cycles(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_manifest(a, parent=b, operation="x", params={})
    write_manifest(b, parent=a, operation="y", params={})
    assert len(lineage(a)) == 2


def test_runs_db_env_override(tmp_path, monkeypatch, tiny_models):
    db = tmp_path / "elsewhere.db"
    monkeypatch.setenv("SLIMLM_RUNS_DB", str(db))
    record("generate", resolve(str(tiny_models("llama"))))
    assert db.exists() and json.loads(json.dumps(list_runs()[0].to_dict(), default=str))["command"] == "generate"
