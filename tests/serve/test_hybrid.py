"""Hybrid routing end to end: the tiny torch model as the small one, a fake OpenAI-compatible
server on loopback (or a second local engine) as the large one, and the real `openai` client."""

from __future__ import annotations

import json
import logging
import random
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import FakeUpstream, closed_port_url, serving, wait_for

from slimlm.errors import SlimlmError
from slimlm.routing import LearnedRouter
from slimlm.serve import Engine, ServeConfig, create_app
from slimlm.serve.hybrid import LedgerWriter
from slimlm.serve.large import COMPLETIONS, Remote, Restorer
from slimlm.serve.ledger import Ledger

KEY_ENV, KEY = "SLIMLM_TEST_BIG_KEY", "sk-test-hybrid0123456789abcdefSECRET"
EMAIL = "maria.rossi@example.com"
PRIVATE = f"Write a short note to {EMAIL} about the invoice."


@contextmanager
def stack(engine, upstream: FakeUpstream | None = None, *, url: str | None = None, large=None, writer=None,
          retries: int = 0, timeout: float = 10.0, key_env: str | None = None, **settings):
    """slimlm serve on loopback, routing to `upstream` (served too), `url`, or `large`."""
    from openai import OpenAI

    records: list[dict] = []

    def on_record(rec):
        records.append(rec)
        if writer is not None:
            writer(rec)

    with ExitStack() as stack_:
        if upstream is not None:
            url = stack_.enter_context(serving(upstream.app())) + "/v1"
        if url is not None:
            large = Remote.open(url, key_env, retries=retries, backoff_s=0.01, timeout_s=timeout)
        base = stack_.enter_context(serving(create_app(engine, ServeConfig(on_record=on_record, **settings),
                                                       large=large)))
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        yield SimpleNamespace(client=client, records=records, url=base, model=engine.name)


def ask(s, content: str = "Name a prime number.", stream: bool = False, route: str | None = None,
        endpoint: str = "chat", max_tokens: int = 8) -> tuple[str, dict]:
    """(the answer's text, the response headers) through the openai client."""
    chat = endpoint == "chat"
    api = s.client.chat.completions if chat else s.client.completions
    args = dict(model=s.model, temperature=0, max_tokens=max_tokens)
    args.update(messages=[{"role": "user", "content": content}]) if chat else args.update(prompt=content)
    if route:
        args["extra_body"] = {"slimlm": {"route": route}}
    before = len(s.records)
    if not stream:
        raw = api.with_raw_response.create(**args)
        choice = raw.parse().choices[0]
        text, headers = (choice.message.content if chat else choice.text), raw.headers
    else:
        with api.with_streaming_response.create(stream=True, **args) as resp:
            pieces = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in resp.parse()
                      if c.choices]
            text, headers = "".join(pieces), resp.headers
    # the record is written by the engine's worker just after the answer is sent
    wait_for(lambda: len(s.records) > before, what="the request's record")
    return text, headers


BOTH = [(e, st) for e in ("chat", "completions") for st in (False, True)]


def test_fixed_policies_and_the_per_request_override(tiny_engine):
    fake = FakeUpstream()
    with stack(tiny_engine, fake, policy="local") as s:
        for endpoint, stream in BOTH:
            text, h = ask(s, stream=stream, endpoint=endpoint)
            assert h["x-slimlm-route"] == "local" and "policy 'local'" in h["x-slimlm-reason"]
            assert text and not text.startswith("big:")
        assert fake.seen == []
        for endpoint, stream in BOTH:
            text, h = ask(s, "Name a prime.", stream=stream, route="large", endpoint=endpoint)
            assert (text, h["x-slimlm-route"]) == ("big: Name a prime.", "large")
            assert h["x-slimlm-reason"] == "the request asked for route 'large'"
        assert [x["path"] for x in fake.seen] == ["/v1/chat/completions"] * 2 + ["/v1/completions"] * 2
        assert all("slimlm" not in x["body"] for x in fake.seen)  # our field stays here
        assert [r["route"] for r in s.records] == ["local"] * 4 + ["large"] * 4
        assert s.records[-1]["tokens_out"] == 5  # the usage slimlm asked the upstream for while streaming

    fake = FakeUpstream()
    with stack(tiny_engine, fake, policy="large", large_name="big-model-x") as s:
        assert ask(s, "hi")[0] == "big: hi" and fake.seen[0]["body"]["model"] == "big-model-x"
        assert ask(s, "hi", route="local")[1]["x-slimlm-route"] == "local"
        assert ask(s, "hi", route="auto")[1]["x-slimlm-route"] == "large"
        scored = s.client.completions.with_raw_response.create(model=s.model, prompt="one two three", max_tokens=0,
                                                               echo=True, logprobs=1)
        assert scored.headers["x-slimlm-route"] == "local" and "scoring" in scored.headers["x-slimlm-reason"]
        bad = httpx.post(f"{s.url}/v1/chat/completions", json={"model": s.model, "slimlm": {"route": "moon"},
                                                               "messages": [{"role": "user", "content": "hi"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "slimlm"
        assert [(r["route"], r["model_large"]) for r in s.records][:2] == [("large", "big-model-x"),
                                                                           ("local", "big-model-x")]
        assert len(fake.seen) == 2


def test_cascade_escalates_below_the_threshold_and_stays_local_above(tiny_engine):
    fake = FakeUpstream()
    with stack(tiny_engine, policy="local") as s:
        probe = ask(s, max_tokens=4)[0]  # what the cascade's held-back first tokens are
    with stack(tiny_engine, fake, policy="cascade", cascade_threshold=-1e9, cascade_first_n=4) as s:
        whole, h = ask(s, max_tokens=24)
        assert h["x-slimlm-route"] == "local" and h["x-slimlm-reason"].startswith("cascade: mean confidence")
        assert whole.startswith(probe) and len(whole) > len(probe)
        text, h = ask(s, stream=True, max_tokens=24)
        assert (text, h["x-slimlm-route"]) == (whole, "local")  # held-back tokens first, then the rest
        assert ask(s, stream=True, endpoint="completions", max_tokens=12)[1]["x-slimlm-route"] == "local"
        assert fake.seen == [] and s.records[0]["tokens_out"] == 24 and s.records[0]["route"] == "local"
    with stack(tiny_engine, fake, policy="cascade", cascade_threshold=0.0, cascade_first_n=4) as s:
        for endpoint, stream in BOTH:
            text, h = ask(s, "Prove it.", stream=stream, endpoint=endpoint)
            assert (text, h["x-slimlm-route"]) == ("big: Prove it.", "large")
            assert "< 0.000" in h["x-slimlm-reason"]
        assert len(fake.seen) == 4
        assert 'slimlm_escalations_total{reason="cascade"} 4.0' in httpx.get(f"{s.url}/metrics").text


def _synthetic(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Greetings the small model handles (1) and arithmetic it does not (0)."""
    rng = random.Random(seed)
    names = ["Maria", "Tom", "Aiko", "Lars", "Fatima", "Diego", "Priya"]
    greet = ["Hello {n}, how are you today?", "Hi there {n}! Nice to meet you.", "Good morning {n}!"]
    sums = ["What is {a} times {b}?", "Compute {a} + {b}.", "Multiply {a} by {b} and give the result."]
    prompts = [rng.choice(greet).format(n=rng.choice(names)) if i % 2 else
               rng.choice(sums).format(a=rng.randint(2, 999), b=rng.randint(2, 99)) for i in range(n)]
    return prompts, [i % 2 for i in range(n)]


def test_learned_router_routes_by_prompt(tiny_engine, tmp_path):
    path = LearnedRouter().fit(*_synthetic(40, seed=1)).save(tmp_path / "router.json")
    fake = FakeUpstream()
    with stack(tiny_engine, fake, policy="learned", router_path=str(path)) as s:
        text, h = ask(s, "Hi there Olga! Nice to meet you.")
        assert h["x-slimlm-route"] == "local" and "learned router" in h["x-slimlm-reason"]
        text, h = ask(s, "What is 417 times 23?")
        assert (text, h["x-slimlm-route"]) == ("big: What is 417 times 23?", "large")
        assert ask(s, "Compute 88 + 19.", endpoint="completions", stream=True)[0] == "big: Compute 88 + 19."
        assert ask(s, "What is 5 times 6?", route="local")[1]["x-slimlm-route"] == "local"
    assert [x["path"] for x in fake.seen] == ["/v1/chat/completions", "/v1/completions"]


def test_privacy_local_keeps_personal_data_on_this_machine(tiny_engine):
    fake = FakeUpstream()
    with stack(tiny_engine, fake, policy="large") as s:  # privacy "local" is the default
        for endpoint, stream in BOTH:
            _, h = ask(s, PRIVATE, stream=stream, endpoint=endpoint)
            assert h["x-slimlm-route"] == "local" and "1 email" in h["x-slimlm-reason"]
            assert "maria" not in h["x-slimlm-reason"]
        assert ask(s, PRIVATE, route="large")[1]["x-slimlm-route"] == "local"  # privacy wins over the override
        assert fake.seen == []
        assert ask(s, "Name a prime.")[1]["x-slimlm-route"] == "large"
    assert [r["privacy"] for r in s.records] == ["local: email"] * 5 + ["local: nothing found"]
    assert "maria" not in json.dumps(s.records)


def test_redact_sends_placeholders_and_restores_the_answer(tiny_engine):
    fake = FakeUpstream()
    with stack(tiny_engine, fake, policy="large", privacy="redact") as s:
        for endpoint, stream in BOTH:
            text, h = ask(s, PRIVATE, stream=stream, endpoint=endpoint)
            assert (text, h["x-slimlm-route"]) == (f"big: {PRIVATE}", "large")  # the address is back
    sent = [json.dumps(x["body"]) for x in fake.seen]
    assert len(sent) == 4 and all("[EMAIL_1]" in b and "maria" not in b for b in sent)
    assert {r["privacy"] for r in s.records} == {"redact: email"} and "maria" not in json.dumps(s.records)


def test_restorer_holds_split_placeholders():
    restorer = Restorer({"[EMAIL_1]": EMAIL, "[PHONE_12]": "+1 202 555 0100"}, COMPLETIONS)
    text = "mail [EMAIL_1], call [PHONE_12] or [PHONE_1x] [EMAIL_1]"
    out = "".join(restorer.feed(0, c) for c in text) + restorer.flush(0)
    assert out == f"mail {EMAIL}, call +1 202 555 0100 or [PHONE_1x] {EMAIL}"
    chunk = {"choices": [{"index": 0, "text": "to [EMA", "finish_reason": None}]}
    restorer.chunk(chunk)
    assert chunk["choices"][0]["text"] == "to " and restorer.held()
    assert restorer.closing({"id": "x"}) == {"id": "x", "choices": [{"index": 0, "text": "[EMA",
                                                                     "finish_reason": None}]}


def test_unreachable_failing_or_slow_upstream_falls_back_to_the_small_model(tiny_engine, tmp_path):
    writer = LedgerWriter(Ledger(tmp_path / "ledger.db"))
    with stack(tiny_engine, url=closed_port_url(), policy="large", writer=writer) as s:
        for endpoint, stream in BOTH:
            text, h = ask(s, stream=stream, endpoint=endpoint)
            assert text and h["x-slimlm-route"] == "local-fallback"
            assert "the large model failed" in h["x-slimlm-reason"]
    with stack(tiny_engine, FakeUpstream("fail"), policy="large", writer=writer, retries=1) as s:
        assert ask(s)[1]["x-slimlm-route"] == "local-fallback"
    with stack(tiny_engine, FakeUpstream("slow", delay=1.5), policy="large", writer=writer, timeout=0.3) as s:
        assert ask(s, stream=True)[1]["x-slimlm-route"] == "local-fallback"
    with stack(tiny_engine, FakeUpstream("slow", delay=0.3), policy="large", writer=writer, timeout=5) as s:
        text, h = ask(s, "hi")
        assert (text, h["x-slimlm-route"]) == ("big: hi", "large")  # slow but in time: the large model answers
    writer.flush()
    rows = writer.ledger.rows()
    assert [r["route"] for r in rows] == ["local-fallback"] * 6 + ["large"]
    assert "unavailable" in rows[0]["reason"] and "HTTP 500" in rows[4]["reason"] and "timed out" in rows[5]["reason"]
    writer.close()


def test_ledger_summary_counts_routes_and_prices_them(tiny_engine, tmp_path, capsys):
    from tests.conftest import run_cli

    writer = LedgerWriter(Ledger(tmp_path / "ledger.db"), price_model="gpt-4o-mini")
    with stack(tiny_engine, FakeUpstream(), policy="local", writer=writer) as s:
        for _ in range(3):
            ask(s, "hi")
        ask(s, "hi", route="large")
        ask(s, "hi", route="large", stream=True)
    with stack(tiny_engine, url=closed_port_url(), policy="large", writer=writer) as s:
        ask(s, "hi")
    writer.flush()
    summary = writer.ledger.summary()
    assert summary["by_route"] == {"local": 3, "large": 2, "local-fallback": 1}
    assert summary["local_share"] == pytest.approx(4 / 6) and summary["unpriced"] == 0
    assert summary["money_saved_usd"] > 0 and summary["large_spent_usd"] > 0
    assert all(r["latency_s"] > 0 and r["tokens_in"] > 0 for r in writer.ledger.rows())
    writer.close()
    code, out, _ = run_cli(capsys, "ledger", "--db", str(tmp_path / "ledger.db"), "--json")
    assert code == 0 and json.loads(out)["by_route"] == summary["by_route"]


def test_api_key_reaches_the_upstream_and_nowhere_else(tiny_engine, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    writer = LedgerWriter(Ledger(tmp_path / "ledger.db"))
    fake = FakeUpstream()
    with stack(tiny_engine, fake, policy="large", writer=writer, key_env=KEY_ENV) as s:
        ask(s, "hi")
        ask(s, "hi", stream=True, endpoint="completions")
    assert [x["auth"] for x in fake.seen] == [f"Bearer {KEY}"] * 2
    with stack(tiny_engine, FakeUpstream("fail", status=401), policy="large", writer=writer, key_env=KEY_ENV) as s:
        text, h = ask(s, "hi")  # the upstream echoes the key in its error: slimlm must not repeat it
    assert h["x-slimlm-route"] == "local-fallback" and "HTTP 401" in h["x-slimlm-reason"]
    writer.flush()
    seen_here = caplog.text + json.dumps(writer.ledger.rows()) + json.dumps(s.records) + json.dumps(dict(h))
    assert KEY not in seen_here and "***" in h["x-slimlm-reason"]
    writer.close()


def test_a_second_local_engine_as_the_large_model(tiny_engine, tiny_models):
    big = Engine.open(str(tiny_models("llama")), "torch", name="big-local")
    try:
        with stack(tiny_engine, large=big, policy="large") as s:
            raw = s.client.chat.completions.with_raw_response.create(
                model=s.model, messages=[{"role": "user", "content": PRIVATE}], max_tokens=5, temperature=0)
            assert raw.headers["x-slimlm-route"] == "large" and raw.parse().model == "big-local"
            assert ask(s, PRIVATE, stream=True)[1]["x-slimlm-route"] == "large"  # nothing leaves: no guard
        assert [(r["route"], r["model_large"], r["privacy"]) for r in s.records] == [("large", "big-local", None)] * 2
    finally:
        big.close()


def test_serve_routing_options_and_refusals(capsys):
    import slimlm.cli  # noqa: F401 - registers every verb
    from tests.conftest import run_cli

    code, out, _ = run_cli(capsys, "serve", "--help")
    assert code == 0 and all(o in out for o in ("--large", "--policy", "--privacy", "--ledger", "--router"))
    for args, expected in [(["--policy", "cascade"], "--large"),
                           (["--large-api-key-env", KEY_ENV], "--large"),
                           (["--policy", "learned", "--large", "http://127.0.0.1:9/v1"], "--router"),
                           (["--privacy", "maybe"], "--privacy"),
                           (["--large-price-model", "gpt-99"], "gpt-4o-mini")]:
        code, _, err = run_cli(capsys, "serve", "smollm2-135m-instruct", *args)
        assert code == 1 and err.count("\n") == 1 and expected in err, (args, err)


def test_large_url_without_a_name_uses_the_one_model_it_serves(tiny_engine, capsys):
    """A second slimlm server as the large model: asking for the local model's name there used
    to fail every escalation (404 model_not_found); now the name comes from its /v1/models."""
    from slimlm.serve.upstream import served_models, the_one_model
    from tests.conftest import run_cli

    with serving(create_app(tiny_engine)) as url:
        assert the_one_model(url + "/v1") == tiny_engine.name
    with serving(FakeUpstream(models=("a", "b")).app()) as url:
        assert served_models(url + "/v1") == ["a", "b"]
        with pytest.raises(SlimlmError, match=r"serves 2 models \(a, b\): choose one with --large-name"):
            the_one_model(url + "/v1")
        code, _, err = run_cli(capsys, "serve", "smollm2-135m-instruct", "--large", url + "/v1", "--no-ledger")
        assert code == 1 and "choose one with --large-name" in err and err.count("\n") == 1
    with pytest.raises(SlimlmError, match="could not ask .* for its models .*--large-name"):
        the_one_model(closed_port_url())
