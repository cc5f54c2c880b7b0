"""The ledger: rows in, summary figures out, checked against a direct computation."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest

from slimlm.errors import SlimlmError
from slimlm.eval.cost import load_api_prices
from slimlm.serve.ledger import Ledger, large_cost_usd, parse_since
from tests.conftest import run_cli


def _rows(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    now = time.time()
    rows = []
    for i in range(n):
        route = rng.choice(["local", "local", "large", "local-fallback"])
        rows.append(dict(
            time=now - (n - i) * 600, route=route, reason=f"test {i}", model_local="smollm2-135m-instruct",
            model_large="gpt-4o-mini", tokens_in=rng.randint(5, 400), tokens_out=rng.randint(1, 300),
            latency_s=rng.uniform(0.05, 3.0), ttft_s=rng.uniform(0.01, 0.5) if i % 5 else None,
            local_cost_usd=rng.uniform(0, 1e-5) if route != "large" else None,
            energy_j=rng.uniform(1, 20) if route != "large" else None,
            large_energy_j=rng.uniform(20, 60) if route != "large" and i % 3 else None,
            privacy="allowed"))
    return rows


def test_large_cost_is_the_price_table_applied_to_the_tokens():
    prices = load_api_prices()
    p = prices["models"]["gpt-4o-mini"]
    expected = (100 * p["input"] + 50 * p["output"]) / 1e6
    assert large_cost_usd("gpt-4o-mini", 100, 50, prices) == pytest.approx(expected)
    assert large_cost_usd("openai/gpt-4o-mini", 100, 50, prices) == pytest.approx(expected)
    assert large_cost_usd("gpt-4o-mini-2024-07-18", 100, 50, prices) == pytest.approx(expected)
    g = prices["models"]["gpt-4o"]
    expected_4o = (100 * g["input"] + 50 * g["output"]) / 1e6
    assert large_cost_usd("gpt-4o-2024-08-06", 100, 50, prices) == pytest.approx(expected_4o)
    assert large_cost_usd("my-own-model", 100, 50, prices) is None
    assert large_cost_usd(None, 100, 50, prices) is None
    assert large_cost_usd("gpt-4o", 0, 0, prices) == 0.0


def test_summary_matches_a_direct_computation(tmp_path):
    rows = _rows()
    book = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    for row in rows:
        book.record(**row)
    prices = load_api_prices()
    s = book.summary()
    local = [r for r in rows if r["route"] != "large"]
    large = {id(r): large_cost_usd("gpt-4o-mini", r["tokens_in"], r["tokens_out"], prices) for r in rows}
    assert s["count"] == len(rows)
    assert s["by_route"] == {k: sum(r["route"] == k for r in rows) for k in ("local", "large", "local-fallback")}
    assert s["local_share"] == pytest.approx(len(local) / len(rows))
    assert s["money_saved_usd"] == pytest.approx(sum(large[id(r)] - r["local_cost_usd"] for r in local))
    assert s["large_spent_usd"] == pytest.approx(sum(large[id(r)] for r in rows if r["route"] == "large"))
    both = [r for r in local if r["large_energy_j"] is not None]
    assert s["energy_saved_j"] == pytest.approx(sum(r["large_energy_j"] - r["energy_j"] for r in both))
    latencies = [r["latency_s"] for r in rows]
    for q in (50, 95, 99):
        assert s[f"latency_p{q}_s"] == pytest.approx(np.percentile(latencies, q))
    assert s["ttft_p50_s"] == pytest.approx(np.percentile([r["ttft_s"] for r in rows if r["ttft_s"] is not None], 50))
    assert s["tokens_in"] == sum(r["tokens_in"] for r in rows)
    book.close()


def test_since_filters_and_empty_summary(tmp_path):
    rows = _rows()
    book = Ledger(tmp_path / "ledger.db")  # a plain path works too
    for row in rows:
        book.record(**row)
    cutoff = rows[40]["time"]
    assert book.summary(since=cutoff)["count"] == len(rows) - 40
    assert book.summary(since="65m")["count"] == 6  # one row every 10 minutes, the newest 10 minutes ago
    empty = Ledger("sqlite://").summary()
    assert empty["count"] == 0 and empty["local_share"] is None and empty["latency_p50_s"] is None
    assert empty["energy_saved_j"] is None and empty["money_saved_usd"] == 0


def test_unknown_energy_and_price_are_not_invented():
    book = Ledger("sqlite://")
    book.record(route="local", model_large="someone-elses-model", tokens_in=10, tokens_out=5, latency_s=0.1)
    s = book.summary()
    assert s["energy_saved_j"] is None
    assert s["money_saved_usd"] == 0 and s["unpriced"] == 1
    assert book.rows()[0]["large_cost_usd"] is None


def test_on_record_takes_a_server_record_as_is():
    book = Ledger("sqlite://")
    book.on_record({"time": 1.0, "endpoint": "/v1/chat/completions", "model": "tiny", "route": "local",
                    "reason": "no router", "model_local": "tiny", "model_large": None, "tokens_in": 3,
                    "tokens_out": 2, "latency_s": 0.2, "ttft_s": 0.05, "status": "ok"})
    (row,) = book.rows()
    assert row["route"] == "local" and row["tokens_out"] == 2 and row["time"] == 1.0


def test_bad_rows_and_bad_since_are_refused():
    book = Ledger("sqlite://")
    with pytest.raises(SlimlmError, match="route must be one of"):
        book.record(route="cloud", tokens_in=1, tokens_out=1)
    with pytest.raises(TypeError, match="unknown ledger column"):
        book.record(route="local", prompt="never stored")
    with pytest.raises(SlimlmError, match="--since"):
        parse_since("last tuesday")
    assert abs(parse_since("2h") - (time.time() - 7200)) < 5


def test_cli_prints_the_summary(tmp_path, capsys):
    import slimlm.cli  # noqa: F401 - registers every verb

    db = tmp_path / "ledger.db"
    book = Ledger(db)
    for row in _rows(20):
        book.record(**row)
    book.close()
    code, stdout, stderr = run_cli(capsys, "ledger", "--db", db, "--json")
    assert code == 0, stderr
    data = json.loads(stdout)
    assert data["count"] == 20 and data["url"] == f"sqlite:///{db}"
    code, stdout, _ = run_cli(capsys, "ledger", "--db", f"sqlite:///{db}", "--since", "1h")
    assert code == 0
    assert "requests" in stdout and "answered locally" in stdout and "latency p50" in stdout
    code, _, stderr = run_cli(capsys, "ledger", "--db", tmp_path / "missing.db")
    assert code == 1 and "no ledger at" in stderr
    code, _, stderr = run_cli(capsys, "ledger", "--db", db, "--since", "soon")
    assert code == 1 and "--since" in stderr


def test_cli_default_is_under_the_data_folder(capsys):
    import slimlm.cli  # noqa: F401 - registers every verb
    from slimlm.serve.ledger import default_ledger_path

    Ledger().record(route="large", model_large="gpt-4o", tokens_in=3, tokens_out=4, latency_s=0.5)
    assert default_ledger_path().exists()
    code, stdout, stderr = run_cli(capsys, "ledger", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["by_route"]["large"] >= 1


def test_list_and_privacy_counts_show_what_left_the_machine(tmp_path, capsys):
    """Rows as hybrid routing records them: the guard's verdict in `privacy`, its reason when it
    kept a request local."""
    import slimlm.cli  # noqa: F401 - registers every verb

    db = tmp_path / "ledger.db"
    book = Ledger(db)
    now = time.time()
    book.record(time=now - 50, route="local", reason="policy: confident", tokens_in=5, tokens_out=3)
    book.record(time=now - 40, route="local", reason="privacy: an email address stays here",
                privacy="local: email", tokens_in=5, tokens_out=3)
    book.record(time=now - 30, route="large", reason="cascade: unsure", privacy="redact: email, phone",
                model_large="gpt-4o-mini", tokens_in=5, tokens_out=3)
    book.record(time=now - 20, route="large", reason="cascade: unsure", privacy="redact: nothing found",
                model_large="gpt-4o-mini", tokens_in=5, tokens_out=3)
    book.record(time=now - 7200, route="large", reason="old", privacy="redact: nothing found", tokens_in=1,
                tokens_out=1)
    book.close()
    code, stdout, stderr = run_cli(capsys, "ledger", "--db", db, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["privacy"] == {"kept local": 1, "redacted": 1, "allowed": 2}
    code, stdout, stderr = run_cli(capsys, "ledger", "list", "--db", db, "--route", "large", "--since", "1h", "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert [(r["reason"], r["privacy_outcome"]) for r in rows] == [("cascade: unsure", "redacted"),
                                                                   ("cascade: unsure", "allowed")]
    code, stdout, _ = run_cli(capsys, "ledger", "list", "--db", db)
    assert code == 0 and "kept" in stdout and "redacted" in stdout and "5 requests" in stdout  # (columns wrap)
    code, stdout, _ = run_cli(capsys, "ledger", "--db", db)
    assert code == 0 and "privacy guard" in stdout and "kept local 1" in stdout
    code, _, stderr = run_cli(capsys, "ledger", "list", "--db", db, "--route", "cloud")
    assert code == 1 and "--route 'cloud'" in stderr
