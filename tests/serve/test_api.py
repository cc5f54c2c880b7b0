"""The OpenAI-compatible API: shapes and numbers through FastAPI's TestClient, then end to end
over a real uvicorn server with the real `openai` client and lm-evaluation-harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import FakeBackend, serving, wait_for

from slimlm.errors import SlimlmError
from slimlm.models.backends.base import GenerationParams
from slimlm.serve import Engine, ServeConfig, create_app
from slimlm.serve.types import Decision

ROOT = Path(__file__).resolve().parents[2]
USER = [{"role": "user", "content": "Name a prime number."}]


@pytest.fixture
def client(tiny_engine):
    records: list[dict] = []
    with TestClient(create_app(tiny_engine, ServeConfig(on_record=records.append))) as c:
        c.records = records
        yield c


def _chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": next(iter(client.app.state.server.engines)),
                                                      "messages": USER, "temperature": 0, **body})


def _complete(client, **body):
    return client.post("/v1/completions", json={"model": next(iter(client.app.state.server.engines)),
                                                "temperature": 0, **body})


def _is_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    return err


# -- unit behaviour (TestClient) ---------------------------------------------------------------
def test_models_health_and_metrics(client, tiny_engine):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [tiny_engine.name]
    assert client.get("/health").json()["models"][tiny_engine.name]["queue_depth"] == 0
    assert _chat(client, max_tokens=3).status_code == 200
    text = client.get("/metrics").text
    for name in ("slimlm_requests_total", "slimlm_tokens_total", "slimlm_request_latency_seconds",
                 "slimlm_time_to_first_token_seconds", "slimlm_escalations", "slimlm_queue_depth"):
        assert name in text
    assert 'slimlm_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
    wait_for(lambda: client.records, what="the request's record")  # written by the worker just after the answer
    [record] = client.records
    assert record["route"] == "local" and record["status"] == "ok" and record["tokens_out"] == 3
    assert record["latency_s"] >= record["ttft_s"] > 0


def test_chat_answers_what_the_backend_generates(client, tiny_engine):
    expected = tiny_engine.backend.generate(USER, GenerationParams(max_tokens=6))
    body = _chat(client, max_tokens=6).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text, "refusal": None}
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"] == {"prompt_tokens": expected.timings.prompt_tokens,
                             "completion_tokens": expected.timings.generated_tokens,
                             "total_tokens": expected.timings.prompt_tokens + expected.timings.generated_tokens}


def test_completions_accept_every_prompt_form(client, tiny_engine):
    ids = tiny_engine.text_ids("def add(a, b):")
    one = _complete(client, prompt="def add(a, b):", max_tokens=5).json()["choices"]
    assert len(one) == 1 and one[0]["index"] == 0
    for prompt in (ids, ["def add(a, b):", "x"], [ids, ids[:3]]):
        choices = _complete(client, prompt=prompt, max_tokens=5).json()["choices"]
        assert [c["index"] for c in choices] == list(range(len(choices)))
        assert choices[0]["text"] == one[0]["text"]  # token ids and text give the same answer


def test_stop_cuts_the_output(client):
    full = _complete(client, prompt="class Stack:", max_tokens=12).json()["choices"][0]["text"]
    stop = full[3:5]
    cut = _complete(client, prompt="class Stack:", max_tokens=12, stop=[stop, "\u2603"]).json()["choices"][0]
    assert cut["text"] == full[:full.index(stop)] and cut["finish_reason"] == "stop"
    assert _complete(client, prompt="class Stack:", max_tokens=12, stop=stop).json()["choices"][0] == cut


def test_echo_logprobs_score_the_prompt_like_slimlm(client, tiny_engine):
    from slimlm.eval.loglik import Request, make_scorer

    ids = tiny_engine.text_ids("Question: What is the capital of Italy?\nAnswer: Rome")
    expected = make_scorer(tiny_engine.backend).score([Request(ids, 1)])[0].logprobs
    choice = _complete(client, prompt=ids, max_tokens=0, echo=True, logprobs=1).json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], expected, atol=1e-5)
    assert len(lp["tokens"]) == len(lp["text_offset"]) == len(ids)
    assert choice["text"] == "".join(lp["tokens"]) and lp["text_offset"][1] == len(lp["tokens"][0])
    # max_tokens 1 (lm-evaluation-harness) adds exactly one generated token after the prompt's
    with_one = _complete(client, prompt=ids, max_tokens=1, echo=True, logprobs=1).json()["choices"][0]["logprobs"]
    assert len(with_one["tokens"]) == len(ids) + 1 and with_one["token_logprobs"][:-1] == lp["token_logprobs"]
    top = with_one["top_logprobs"][-1]
    assert with_one["token_logprobs"][-1] == max(top.values())  # greedy: the chosen token is the top one


def test_chat_logprobs_shape(client):
    choice = _chat(client, max_tokens=4, logprobs=True, top_logprobs=3).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert 1 <= len(content) <= 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3 and entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6
    assert _chat(client, max_tokens=4).json()["choices"][0]["logprobs"] is None


def _events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames)
    return [json.loads(f[6:]) for f in frames[:-1]]


def test_streaming_chat_and_completions_frame_like_openai(client):
    whole = _chat(client, max_tokens=8).json()
    events = _events(_chat(client, max_tokens=8, stream=True, stream_options={"include_usage": True}).text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == \
        whole["choices"][0]["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    text = _complete(client, prompt=["a", "b"], max_tokens=4, stream=True).text
    pieces = {0: "", 1: ""}
    for e in _events(text):
        pieces[e["choices"][0]["index"]] += e["choices"][0]["text"]
    batch = _complete(client, prompt=["a", "b"], max_tokens=4).json()["choices"]
    assert pieces == {c["index"]: c["text"] for c in batch}


def test_api_keys(tiny_engine):
    app = create_app(tiny_engine, ServeConfig(api_keys=["k1", "k2"]))
    with TestClient(app) as c:
        assert _is_error(c.get("/v1/models"), 401, "invalid_api_key")["message"].startswith("no API key")
        assert _is_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.get("/health").status_code == 200  # monitoring stays open


def test_content_parts_developer_role_and_chunked_bodies(tiny_engine):
    with TestClient(create_app(tiny_engine, ServeConfig(max_body_bytes=8192))) as c:
        plain = _chat(c, max_tokens=4, messages=[{"role": "system", "content": "Be brief."}, *USER]).json()
        parts = _chat(c, max_tokens=4, messages=[{"role": "developer", "content": "Be brief."},
                                                 {"role": "user", "content": [{"type": "text", "text": "Name a "},
                                                                              {"type": "text", "text": "prime number."}]}])
        assert parts.json()["choices"] == plain["choices"]
        body = json.dumps({"model": tiny_engine.name, "prompt": "hi", "max_tokens": 1}).encode()
        chunked = c.post("/v1/completions", content=iter([body[:10], body[10:]]),
                         headers={"Content-Type": "application/json"})
        assert chunked.status_code == 200  # read under the limit, then replayed to the route
        _is_error(c.post("/v1/completions", content=iter([b"x" * 5000, b"y" * 5000])), 413, "body_too_large")


def test_config_checks():
    with pytest.raises(SlimlmError, match="--api-key-env"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_keys=["k"]).api_keys == ["k"]
    assert ServeConfig(host="::1").host == "::1"
    with pytest.raises(SlimlmError, match="--queue-size"):
        ServeConfig(queue_size=0)
    from slimlm.serve.config import keys_from_env, parse_adapters

    with pytest.raises(SlimlmError, match="NAME=PATH"):
        parse_adapters(["nopath"])
    with pytest.raises(SlimlmError, match="not set"):
        keys_from_env("SLIMLM_TEST_SURELY_UNSET")


def test_lora_adapters_on_one_base(tiny_models, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tiny_models("llama")
    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                          LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                     init_lora_weights=False))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)  # a visible change to greedy output
    lora.save_pretrained(tmp_path / "lora")
    engine = Engine.open(str(base_dir), "torch", adapters={"tuned": str(tmp_path / "lora")})
    try:
        with TestClient(create_app(engine, ServeConfig())) as c:
            name = engine.name
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [name, f"{name}:tuned"]

            def run(model):
                body = {"model": model, "prompt": "import os\n", "max_tokens": 8, "temperature": 0,
                        "echo": True, "logprobs": 0}
                return c.post("/v1/completions", json=body).json()["choices"][0]

            before, tuned, after = run(name), run(f"{name}:tuned"), run(name)
            assert tuned["logprobs"]["token_logprobs"] != before["logprobs"]["token_logprobs"]
            assert before == after  # switching back disables the adapter's layers
            _is_error(c.post("/v1/completions", json={"model": f"{name}:other", "prompt": "x"}), 404)
    finally:
        engine.close()


class _Upstream:
    def __init__(self, fail: bool = False):
        self.fail, self.bodies = fail, []

    async def chat(self, body):
        self.bodies.append(body)
        if self.fail:
            raise ConnectionError("upstream down")
        return {"id": "up", "object": "chat.completion", "model": "big-model", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "from upstream"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}

    async def stream(self, body):
        for piece in ("from ", "upstream"):
            yield {"id": "up", "object": "chat.completion.chunk", "model": "big-model",
                   "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}


class _Router:
    def __init__(self, upstream=None):
        self.upstream, self.seen = upstream, []

    def decide(self, prompt_text, body):
        self.seen.append(prompt_text)
        return Decision("large", "asks for a proof") if "prove" in prompt_text else Decision("local", "easy")


def test_router_hook_escalates_and_falls_back(tiny_engine):
    records = []
    router = _Router(_Upstream())
    with TestClient(create_app(tiny_engine, ServeConfig(on_record=records.append), router_hook=router)) as c:
        model = tiny_engine.name
        hard = {"model": model, "messages": [{"role": "user", "content": "prove it"}], "max_tokens": 3}
        assert c.post("/v1/chat/completions", json=hard).json()["choices"][0]["message"]["content"] == "from upstream"
        assert router.upstream.bodies[0]["messages"] == hard["messages"]  # the body is forwarded as sent
        events = _events(c.post("/v1/chat/completions", json={**hard, "stream": True}).text)
        assert "".join(e["choices"][0]["delta"]["content"] for e in events) == "from upstream"
        easy = c.post("/v1/chat/completions", json={**hard, "messages": USER}).json()
        assert easy["model"] == model
        router.upstream.fail = True
        assert c.post("/v1/chat/completions", json=hard).status_code == 200
        wait_for(lambda: len(records) >= 4, what="the fallback's record")  # written just after the response
        assert [(r["route"], r["model_large"]) for r in records] == [
            ("large", "big-model"), ("large", "big-model"), ("local", None), ("local-fallback", None)]
        assert "upstream down" in records[-1]["reason"] and records[0]["tokens_in"] == 5
        assert 'slimlm_escalations_total{reason="asks for a proof"} 2.0' in c.get("/metrics").text
    with TestClient(create_app(tiny_engine, ServeConfig(), router_hook=_Router())) as c:
        _is_error(c.post("/v1/chat/completions", json=hard), 503, "no_upstream")

    class PromptOnly:  # a policy that decides from the text alone, and fails on some
        def decide(self, prompt):
            if "boom" in prompt:
                raise ValueError("broken policy")
            return Decision("local", "short prompt")

    records.clear()
    with TestClient(create_app(tiny_engine, ServeConfig(on_record=records.append), router_hook=PromptOnly())) as c:
        assert c.post("/v1/chat/completions", json={**hard, "messages": USER}).status_code == 200
        boom = {**hard, "messages": [{"role": "user", "content": "boom"}]}
        assert c.post("/v1/chat/completions", json=boom).status_code == 200  # a failing router answers locally
        wait_for(lambda: len(records) >= 2, what="both records")
    assert [(r["route"], r["reason"].split(" (")[0]) for r in records] == [("local", "short prompt"),
                                                                          ("local", "the router failed")]


# -- end to end: uvicorn on a loopback port ---------------------------------------------------
def test_openai_client_end_to_end(tiny_engine):
    from openai import OpenAI

    with serving(create_app(tiny_engine, ServeConfig())) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        name = tiny_engine.name
        assert [m.id for m in client.models.list()] == [name]
        reply = client.chat.completions.create(model=name, messages=USER, max_tokens=6, temperature=0, seed=1)
        text = reply.choices[0].message.content
        assert reply.usage.completion_tokens >= 1 and text
        stream = client.chat.completions.create(model=name, messages=USER, max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
        done = client.completions.create(model=name, prompt="for i in", max_tokens=5, temperature=0)
        streamed = client.completions.create(model=name, prompt="for i in", max_tokens=5, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
        sampled = client.completions.create(model=name, prompt="x =", max_tokens=5, temperature=1.0, top_p=0.9,
                                            seed=7)
        again = client.completions.create(model=name, prompt="x =", max_tokens=5, temperature=1.0, top_p=0.9, seed=7)
        assert sampled.choices[0].text == again.choices[0].text  # a seed makes sampling repeatable


def test_concurrent_clients_get_their_own_answers(tiny_engine):
    prompts = ["def f(x):", "import sys", "class A:", "while True:", "return None", "# comment"]
    with serving(create_app(tiny_engine, ServeConfig())) as url:
        def ask(prompt, stream=False):
            body = {"model": tiny_engine.name, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            if stream:
                return "".join(e["choices"][0]["text"] for e in _events(r.text))
            return r.json()["choices"][0]["text"]

        expected = [ask(p) for p in prompts]
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda i: ask(prompts[i % 6], stream=i % 2 == 0), range(12)))
        assert got == [expected[i % 6] for i in range(12)]


def test_full_queue_answers_429_with_retry_after():
    backend = FakeBackend()
    backend.gate.clear()
    engine = Engine(backend, queue_size=1)
    body = {"model": "fake", "prompt": "hi", "max_tokens": 2}
    with serving(create_app(engine, ServeConfig(retry_after_s=3))) as url:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
            wait_for(lambda: engine._active is not None, what="the first request to run")
            second = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
            wait_for(lambda: engine.queue_depth == 2, what="the second request to queue")
            refused = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            _is_error(refused, 429, "queue_full")
            assert refused.headers["Retry-After"] == "3"
            backend.gate.set()
            assert first.result().json()["choices"][0]["text"] == "xx" and second.result().status_code == 200
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200


def test_client_disconnect_stops_generation():
    backend = FakeBackend(delay=0.01)
    engine = Engine(backend)
    records = []
    with serving(create_app(engine, ServeConfig(on_record=records.append))) as url:
        body = {"model": "fake", "messages": USER, "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data:")) >= 3
        wait_for(lambda: records, what="the cancelled request's record")
        assert records[0]["status"] == "cancelled" and records[0]["tokens_out"] < 200
        produced = backend.produced
        assert produced < 200  # 1000 tokens would take 10 s; generation stopped with the client
        again = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        assert again.json()["choices"][0]["message"]["content"] == "xxx"


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"model": "M", "messages": "hi"}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "max_tokens": "5"}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "stream": 1}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "M", "messages": []}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "nope", "messages": USER}, 404, "model_not_found"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "max_tokens": 10_000}, 400, "max_tokens_too_large"),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "n": 2}, 400, None),
    ("/v1/chat/completions", {"model": "M", "messages": USER, "top_logprobs": 2}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": "word " * 400}]}, 400,
     "context_length_exceeded"),
    ("/v1/completions", {"model": "M", "prompt": []}, 400, "empty_prompt"),
    ("/v1/completions", {"model": "M", "prompt": [1, "a"]}, 400, "invalid_value"),
    ("/v1/completions", {"model": "M", "prompt": [10**9]}, 400, "invalid_token"),
    ("/v1/completions", {"model": "M", "prompt": "x", "temperature": -1}, 400, "invalid_value"),
    ("/v1/completions", b'{"model": "M", "prompt": "' + b"x" * 9000 + b'"}', 413, "body_too_large"),
    ("/v1/nothing", {"model": "M"}, 404, "not_found"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(tiny_engine):
    with serving(create_app(tiny_engine, ServeConfig(max_body_bytes=8192))) as url:
        for path, body, status, code in BAD_REQUESTS:
            if isinstance(body, dict):
                body = json.dumps(body).replace('"M"', json.dumps(tiny_engine.name)).encode()
            r = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
            _is_error(r, status, code)
            ok = httpx.post(f"{url}/v1/completions", json={"model": tiny_engine.name, "prompt": "ok", "max_tokens": 1},
                            timeout=30)
            assert ok.status_code == 200, (path, body[:80])
    with serving(create_app(tiny_engine, ServeConfig(api_keys=["secret"]))) as url:
        _is_error(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200


def test_lm_eval_local_completions_matches_slimlm_eval(tiny_engine, tmp_path, monkeypatch):
    import tenacity  # noqa: F401 - lm-eval[api] is a test dependency: missing, this fails rather than skips
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from slimlm.eval import evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = ROOT / "examples" / "tasks" / "capitals.jsonl"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "capitals_served.yaml").write_text(
        "task: capitals_served\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    folder = tiny_engine.backend.ref.path
    with serving(create_app(tiny_engine, ServeConfig())) as url:
        out = simple_evaluate(model="local-completions", tasks=["capitals_served"], log_samples=True,
                              task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
                              model_args=f"model={tiny_engine.name},base_url={url}/v1/completions,"
                                         f"tokenizer_backend=huggingface,tokenizer={folder},max_retries=1")
    # The server computes in the backend's own plan (dtype auto); `slimlm eval` scores in fp32 unless asked.
    ours = evaluate(str(folder), str(ROOT / "examples" / "tasks" / "capitals.yaml"), backend="torch", dtype="auto",
                    systems=False, record=False)
    assert out["results"]["capitals_served"]["acc,none"] == pytest.approx(ours.metrics["acc"])
    for sample in out["samples"]["capitals_served"]:
        theirs = [resp[0][0] for resp in sample["resps"]]
        np.testing.assert_allclose(theirs, ours.details[sample["doc_id"]]["loglik"], atol=1e-3)


# -- the command line and the real model ------------------------------------------------------
def test_serve_help_and_refusals(capsys):
    import slimlm.cli  # noqa: F401 - registers every verb
    from tests.conftest import run_cli

    code, out, _ = run_cli(capsys, "serve", "--help")
    assert code == 0 and "OpenAI(base_url=" in out and "--api-key-env" in out
    code, _, err = run_cli(capsys, "serve", "smollm2-135m-instruct", "--host", "0.0.0.0")
    assert code == 1 and err.count("\n") == 1 and "--api-key-env" in err
    code, _, err = run_cli(capsys, "serve", "smollm2-135m-instruct", "--api-key-env", "SLIMLM_TEST_SURELY_UNSET")
    assert code == 1 and "not set" in err
    code, _, err = run_cli(capsys, "serve", "smollm2-135m-instruct", "--cache-ram", "-5")
    assert code == 1 and err.count("\n") == 1 and "--cache-ram" in err


@pytest.mark.real_model
def test_slimlm_serve_smollm2_with_the_openai_client(smollm2_gguf):
    import socket

    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from slimlm.cli import main; main()", "serve",
           "smollm2-135m-instruct", "--port", str(port), "--n-ctx", "1024", "--api-key-env", "SLIMLM_TEST_KEYS"]
    proc = subprocess.Popen(cmd, env={**os.environ, "SLIMLM_TEST_KEYS": "k1,k2", "SLIMLM_LOG": "warning"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=120, what="slimlm serve to start")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=8,
                                               messages=question)
        text = reply.choices[0].message.content
        assert text.strip() and reply.usage.completion_tokens == 8
        stream = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=8,
                                                messages=question, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
        scored = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is Paris",
                                           max_tokens=0, echo=True, logprobs=1)
        lps = scored.choices[0].logprobs.token_logprobs
        assert lps[0] is None and all(x <= 0 for x in lps[1:]) and lps[-1] > -5  # " Paris" is likely here
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_readme_client_example_runs(tiny_engine, capsys):
    """The five-line client example in the README, run as written against a served tiny model
    (only the URL and model name are swapped for the test server's)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    serve_section = readme.split("## Serve:", 1)[1]
    code = re.search(r"```python\n(.*?)```", serve_section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 6 and "OpenAI(base_url=" in code
    with serving(create_app(tiny_engine, ServeConfig())) as url:
        runnable = code.replace("http://127.0.0.1:8000", url).replace('"smollm2-135m-instruct"',
                                                                     repr(tiny_engine.name))
        exec(compile(runnable, "README.md", "exec"), {})
    assert capsys.readouterr().out.endswith("\n")  # it printed the reply (a random tiny model's may be blank)
