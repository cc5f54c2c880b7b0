"""A routing policy is one class plus one registry line: a policy registered here, from the test
module, routes requests through the real server (and is known to ServeConfig and the CLI while
registered), and it leaves the registry as it found it."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serve_helpers import wait_for

from slimlm.errors import SlimlmError
from slimlm.serve import ServeConfig, create_app
from slimlm.serve.large import Remote
from slimlm.serve.policies import POLICIES, POLICY_REGISTRY, RoutingPolicy, register_policy
from slimlm.serve.types import Decision
from tests.conftest import run_cli

BUILT_IN = ["local", "large", "cascade", "learned"]
README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


class Keyword(RoutingPolicy):
    """Escalates the prompts that ask for a proof; keeps the rest on this machine."""

    help = "prompts with 'prove' go to --large (a test policy)"
    labelled = True

    def decide(self, prompt: str) -> Decision:
        if "prove" in prompt.lower():
            return Decision("large", "keyword policy: asks for a proof")
        return Decision("local", "keyword policy: no proof asked for")


class _Upstream:
    """The large model: answers "big: " + the last message, and keeps what it was sent."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    async def chat(self, body):
        self.bodies.append(body)
        text = "big: " + body["messages"][-1]["content"]
        return {"id": "up", "object": "chat.completion", "created": 0, "model": "big-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

    async def stream(self, body):  # not asked for here
        raise NotImplementedError


@pytest.fixture
def keyword():
    """The test policy, registered for one test and removed after it."""
    register_policy("keyword")(Keyword)
    yield Keyword
    POLICY_REGISTRY.pop("keyword")


def _chat(client, model: str, content: str):
    return client.post("/v1/chat/completions", json={"model": model, "max_tokens": 4, "temperature": 0,
                                                     "messages": [{"role": "user", "content": content}]})


def test_the_built_in_policies_are_registered_in_order():
    assert list(POLICIES) == BUILT_IN
    assert [name for name, cls in POLICY_REGISTRY.items() if not cls.needs_large] == ["local"]


def test_readme_shows_every_built_in_policy():
    table = README[README.index("| policy | decides |"):]
    table = table[:table.index("\n\n")]
    for name in BUILT_IN:
        assert f"`{name}`" in table, f"README.md's policy table has no row for `{name}`"


def test_a_registered_policy_routes_requests_through_the_server(tiny_engine, keyword):
    records, upstream = [], _Upstream()
    config = ServeConfig(policy="keyword", on_record=records.append, privacy="off")
    with TestClient(create_app(tiny_engine, config, large=Remote(upstream))) as client:
        hard = _chat(client, tiny_engine.name, "Prove that 7 is prime.")
        assert hard.status_code == 200, hard.text
        assert hard.headers["x-slimlm-route"] == "large"
        assert hard.headers["x-slimlm-reason"] == "keyword policy: asks for a proof"
        assert hard.json()["choices"][0]["message"]["content"] == "big: Prove that 7 is prime."
        easy = _chat(client, tiny_engine.name, "Name a colour.")
        assert easy.status_code == 200 and easy.headers["x-slimlm-route"] == "local"
        assert easy.json()["model"] == tiny_engine.name
        forced = client.post("/v1/chat/completions", json={"model": tiny_engine.name, "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": "prove it"}],
                                                           "slimlm": {"route": "local"}})
        assert forced.headers["x-slimlm-route"] == "local"  # the per-request override still wins
        wait_for(lambda: len(records) >= 3, what="the three records")
        assert [r["route"] for r in records] == ["large", "local", "local"]
        assert len(upstream.bodies) == 1
        assert 'slimlm_escalations_total{reason="policy keyword"} 1.0' in client.get("/metrics").text


def test_a_registered_policy_is_known_to_the_config_and_the_cli(capsys, keyword):
    assert ServeConfig(policy="keyword").policy == "keyword"
    code, _, err = run_cli(capsys, "serve", "smollm2-135m-instruct", "--policy", "keyword")
    assert code == 1 and "--policy keyword sends requests to a large model" in err  # needs_large, from the class


def test_the_test_policy_is_gone_after_its_test():
    assert "keyword" not in POLICIES
    with pytest.raises(SlimlmError, match="choose one of local, large, cascade, learned"):
        ServeConfig(policy="keyword")


def test_a_policy_cannot_replace_another_or_lack_help():
    with pytest.raises(ValueError, match="already registered"):
        register_policy("cascade")(Keyword)

    class NoHelp(RoutingPolicy):
        pass

    with pytest.raises(ValueError, match="help"):
        register_policy("no-help")(NoHelp)
    assert list(POLICIES) == BUILT_IN


def test_serve_help_lists_every_registered_policy(capsys, keyword):
    code, out, _ = run_cli(capsys, "serve", "--help")
    text = " ".join(out.replace("│", " ").split())  # help is wrapped to the terminal width, in a box
    assert code == 0
    assert list(POLICIES) == [*BUILT_IN, "keyword"]  # the help is read when the CLI runs
    for name in POLICIES:
        assert f"{name}:" in text, name
