"""`slimlm serve --engine URL`: slimlm's API, routing, privacy guard and ledger in front of an
external OpenAI-compatible engine, tested against a real llama-server on loopback (and, where a
test must see what reached the engine, the fake upstream)."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_helpers import FakeUpstream, closed_port_url, serving

from slimlm.errors import SlimlmError
from slimlm.serve import ServeConfig, create_app
from slimlm.serve.external import ExternalEngine

pytestmark = [pytest.mark.llamacpp]
BODY = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 12, "temperature": 0}


def test_requests_are_relayed_to_llama_server_and_recorded(llama_server):
    engine = ExternalEngine.open(llama_server.url)
    assert engine.name == "tiny-engine"  # from the engine's own /v1/models
    direct = httpx.post(llama_server.url + "/chat/completions", json={"model": engine.name, **BODY}, timeout=60).json()
    records: list[dict] = []
    with TestClient(create_app(engine, ServeConfig(on_record=records.append))) as c:
        answer = c.post("/v1/chat/completions", json={"model": engine.name, **BODY}).json()
        assert answer["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
        with c.stream("POST", "/v1/chat/completions", json={"model": engine.name, "stream": True, **BODY}) as r:
            assert r.status_code == 200 and r.headers["x-slimlm-route"] == "local"
            pieces = [json.loads(line[6:])["choices"] for line in r.iter_lines() if line.startswith("data: {")]
        text = "".join(ch[0]["delta"].get("content") or "" for ch in pieces if ch)
        assert text == direct["choices"][0]["message"]["content"]
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["models"][engine.name]["reachable"] is True
        assert c.post("/v1/chat/completions", json={"model": "other", **BODY}).status_code == 404
    assert [(r["route"], r["model_local"], r["model_large"]) for r in records] == [("local", engine.name, None)] * 2
    assert records[0]["tokens_out"] == direct["usage"]["completion_tokens"]
    assert engine.inflight == 0


def test_an_engine_that_stops_answering_is_a_503(llama_server):
    engine = ExternalEngine.open(llama_server.url)
    with TestClient(create_app(engine)) as c:
        assert c.post("/v1/chat/completions", json={"model": engine.name, **BODY}).status_code == 200
        llama_server.proc.terminate()
        llama_server.proc.wait(10)
        r = c.post("/v1/chat/completions", json={"model": engine.name, **BODY})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert llama_server.url.removesuffix("/v1") in r.json()["error"]["message"]
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["models"][engine.name]["reachable"] is False
    assert engine.inflight == 0


def test_a_remote_engine_gets_personal_data_only_redacted():
    fake = FakeUpstream(models=("engine-model",))
    mail = "Write to jane.doe@example.com about it."
    with serving(fake.app()) as url:
        kept = ExternalEngine.open(url + "/v1", remote=True, privacy="local")
        with TestClient(create_app(kept, ServeConfig(privacy="local"))) as c:
            r = c.post("/v1/chat/completions", json={"model": "engine-model",
                                                     "messages": [{"role": "user", "content": mail}]})
            assert r.status_code == 403 and r.json()["error"]["code"] == "privacy_refused"
            assert c.post("/v1/chat/completions", json={"model": "engine-model", **BODY}).status_code == 200
        redacting = ExternalEngine.open(url + "/v1", remote=True, privacy="redact")
        with TestClient(create_app(redacting, ServeConfig(privacy="redact"))) as c:
            r = c.post("/v1/chat/completions", json={"model": "engine-model",
                                                     "messages": [{"role": "user", "content": mail}]})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == f"big: {mail}"
        trusted = ExternalEngine.open(url + "/v1")  # not marked remote: the guard stays out of the way
        with TestClient(create_app(trusted, ServeConfig(privacy="local"))) as c:
            assert c.post("/v1/chat/completions", json={"model": "engine-model", "messages": [
                {"role": "user", "content": mail}]}).status_code == 200
    sent = [s["body"]["messages"][-1]["content"] for s in fake.seen]
    assert "jane.doe@example.com" not in sent[1] and "[EMAIL_1]" in sent[1]  # redacted on the way out
    assert sent[2] == mail and len(sent) == 3  # the refused one never left


def test_engine_bad_input_is_refused_at_start_up(capsys):
    from tests.conftest import run_cli

    with pytest.raises(SlimlmError, match="could not ask .* for its models"):
        ExternalEngine.open(closed_port_url())
    with serving(FakeUpstream(models=("engine-model",)).app()) as url:
        engine = ExternalEngine.open(url + "/v1")
        with pytest.raises(SlimlmError, match="--policy cascade .* --engine"):
            create_app(engine, ServeConfig(policy="cascade", cascade_threshold=-1.0), large=None)
    for args, expected in [([], "give a MODEL"),
                           (["smollm2-135m-instruct", "--engine", "http://127.0.0.1:9/v1"], "not both"),
                           (["smollm2-135m-instruct", "--engine-remote"], "are for --engine URL"),
                           (["--engine", closed_port_url(), "--no-ledger"], "could not ask")]:
        code, _, err = run_cli(capsys, "serve", *args)
        assert code == 1 and expected in err and err.count("\n") == 1, (args, err)
