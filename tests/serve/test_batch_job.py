"""`slimlm batch`: OpenAI batch files through the serving routes, in input order, resumable
after a kill at any moment, with file:line errors for bad lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.llamacpp]


def _requests(path, n, model="tiny-f32", tokens=24):
    rows = []
    for i in range(n):
        if i % 2:
            body = {"model": model, "prompt": f"Item {i}: the", "max_tokens": tokens, "temperature": 0}
            url = "/v1/completions"
        else:
            body = {"model": model, "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": tokens,
                    "temperature": 0}
            url = "/v1/chat/completions"
        rows.append({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _cli(capfd, *args):
    """run_cli with stderr's lines joined (rich wraps long messages at the terminal width)."""
    code, out, err = run_cli(capfd, *args)
    return code, out, " ".join(err.split())


def _answers(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _text(row):
    choice = row["response"]["body"]["choices"][0]
    return choice.get("text", (choice.get("message") or {}).get("content"))


def test_batch_answers_in_input_order_as_the_server_would(tiny_gguf, tmp_path, capfd):
    from fastapi.testclient import TestClient

    from slimlm.serve import Engine, create_app

    reqs = _requests(tmp_path / "in.jsonl", 6)
    code, _, err = _cli(capfd, "batch", tiny_gguf, tmp_path / "in.jsonl", "--out", tmp_path / "out.jsonl",
                           "--parallel", "3", "--n-ctx", "256")
    assert code == 0, err
    assert "6 requests answered" in err and "3 slots" in err
    rows = _answers(tmp_path / "out.jsonl")
    assert [r["custom_id"] for r in rows] == [r["custom_id"] for r in reqs]
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in rows)
    assert not (tmp_path / "out.jsonl.partial").exists()
    engine = Engine.open(str(tiny_gguf), "llamacpp", n_ctx=256)  # one at a time, over the API
    try:
        with TestClient(create_app(engine)) as c:
            want = [c.post(r["url"], json=r["body"]).json() for r in reqs]
    finally:
        engine.close()
    assert [_text(r) for r in rows] == [w["choices"][0].get("text", (w["choices"][0].get("message") or {}).get(
        "content")) for w in want]


def test_a_killed_batch_continues_without_asking_twice(tiny_gguf, tmp_path, capfd):
    reqs = _requests(tmp_path / "in.jsonl", 40, tokens=48)
    out, partial = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    cmd = [sys.executable, "-c", "from slimlm.cli import main; main()", "batch", str(tiny_gguf),
           str(tmp_path / "in.jsonl"), "--out", str(out), "--parallel", "2", "--n-ctx", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not partial.exists() or partial.read_text().count("\n") < 5):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = partial.read_text().splitlines()
    assert 5 <= len(before) < 40 and not out.exists()
    with partial.open("a") as fh:  # a line cut off mid-write
        fh.write('{"id": "batch_req_x", "custom_id": "r3')
    code, _, err = _cli(capfd, "batch", tiny_gguf, tmp_path / "in.jsonl", "--out", out, "--parallel", "2",
                           "--n-ctx", "256")
    assert code == 0, err
    assert f"resuming: {len(before)} of 40 already answered" in err
    rows = _answers(out)
    assert [r["custom_id"] for r in rows] == [r["custom_id"] for r in reqs]
    kept = {json.loads(line)["id"] for line in before}
    assert kept <= {r["id"] for r in rows}  # answers from before the kill were kept, not asked again


def test_bad_batch_input_is_one_clear_line(tiny_gguf, tmp_path, capfd):
    reqs = _requests(tmp_path / "in.jsonl", 3)
    with (tmp_path / "in.jsonl").open("a") as fh:
        fh.write('{"custom_id": "x", "url": "/v1/embeddings", "body": {}}\n{oops\n')
    code, _, err = _cli(capfd, "batch", tiny_gguf, tmp_path / "in.jsonl", "--out", tmp_path / "o.jsonl")
    assert code != 0 and "in.jsonl:4: url '/v1/embeddings'" in err and "--skip-bad-lines" in err
    assert "Traceback" not in err and not (tmp_path / "o.jsonl").exists()
    code, _, err = _cli(capfd, "batch", tiny_gguf, tmp_path / "in.jsonl", "--out", tmp_path / "o.jsonl",
                           "--skip-bad-lines", "--n-ctx", "256")
    assert code == 0 and "skipped" in err and "in.jsonl:5: not valid JSON" in err
    assert [r["custom_id"] for r in _answers(tmp_path / "o.jsonl")] == [r["custom_id"] for r in reqs]
    code, _, err = _cli(capfd, "batch", tiny_gguf, tmp_path / "in.jsonl", "--out", tmp_path / "o.jsonl",
                           "--skip-bad-lines")
    assert code != 0 and "exists: pass --force" in err
    dup = tmp_path / "dup.jsonl"
    dup.write_text((tmp_path / "in.jsonl").read_text().splitlines()[0] + "\n" +
                   (tmp_path / "in.jsonl").read_text().splitlines()[0] + "\n")
    code, _, err = _cli(capfd, "batch", tiny_gguf, dup, "--out", tmp_path / "d.jsonl")
    assert code != 0 and "custom_id 'r0' appears twice" in err
    (tmp_path / "other.jsonl.partial").write_text(json.dumps({"custom_id": "zz", "id": "q"}) + "\n")
    code, _, err = _cli(capfd, "batch", tiny_gguf, tmp_path / "in.jsonl", "--out", tmp_path / "other.jsonl",
                           "--skip-bad-lines", "--n-ctx", "256")
    assert code != 0 and "belongs to another batch" in err


def test_a_request_the_server_refuses_is_an_error_row(tiny_gguf, tmp_path, capfd):
    (tmp_path / "in.jsonl").write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                                   "body": {"model": "nope", "prompt": "x"}}) + "\n")
    code, _, err = _cli(capfd, "batch", tiny_gguf, tmp_path / "in.jsonl", "--out", tmp_path / "o.jsonl",
                           "--n-ctx", "256")
    assert code == 0 and "1 with an error" in err
    [row] = _answers(tmp_path / "o.jsonl")
    assert row["response"]["status_code"] == 404 and row["error"]["message"]
