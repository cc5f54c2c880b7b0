"""The upstream client against real HTTP servers on loopback that misbehave on cue."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slimlm.errors import SlimlmError
from slimlm.serve.upstream import Upstream, UpstreamError, UpstreamUnavailable

KEY = "sk-test-0123456789abcdefSECRET"
ANSWER = {"id": "c1", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}]}
BODY = {"model": "big", "messages": [{"role": "user", "content": "2+2?"}]}


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body,
                            "at": time.monotonic()})
        action = server.script.pop(0) if server.script else server.default
        if action == "slow":
            time.sleep(1.0)
            action = "ok"
        if isinstance(action, int):
            payload = json.dumps({"error": {"message": f"boom {action} {self.headers.get('Authorization')}"}})
            self.send_response(action)
            if action == 429:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload.encode())
            return
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for piece in ["Hel", "lo"]:
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                if action == "break":  # the connection drops mid-answer
                    return
            self.wfile.write(b": keep-alive comment\n\ndata: [DONE]\n\n")
            return
        payload = json.dumps(ANSWER).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that timed out is expected here
        pass


@pytest.fixture
def fake():
    """A loopback server: set .script to a list of actions (ok, slow, or an HTTP status)."""
    server = FakeServer(("127.0.0.1", 0), _Handler)
    server.script, server.default, server.seen = [], "ok", []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


def _run(upstream: Upstream, coro_fn):
    async def main():
        async with upstream:
            return await coro_fn(upstream)
    return asyncio.run(main())


async def _collect(upstream: Upstream) -> list[dict]:
    return [chunk async for chunk in upstream.stream(BODY)]


def test_ok_chat_and_stream(fake):
    assert _run(Upstream(fake.url), lambda u: u.chat({**BODY, "stream": True})) == ANSWER
    assert fake.seen[0]["path"] == "/v1/chat/completions" and fake.seen[0]["body"]["stream"] is False
    chunks = _run(Upstream(fake.url), _collect)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Hello"
    assert fake.seen[1]["body"]["stream"] is True and fake.seen[0]["auth"] is None


def test_authorization_header_carries_the_env_key(fake, monkeypatch):
    monkeypatch.setenv("SLIMLM_TEST_KEY", KEY)
    upstream = Upstream(fake.url, api_key_env="SLIMLM_TEST_KEY")
    assert KEY not in repr(upstream)
    _run(upstream, lambda u: u.chat(BODY))
    assert fake.seen[0]["auth"] == f"Bearer {KEY}"


def test_missing_key_variable_is_a_user_error(fake, monkeypatch):
    monkeypatch.delenv("SLIMLM_NO_SUCH_KEY", raising=False)
    with pytest.raises(SlimlmError, match="SLIMLM_NO_SUCH_KEY is not set"):
        Upstream(fake.url, api_key_env="SLIMLM_NO_SUCH_KEY")
    with pytest.raises(SlimlmError, match="http"):
        Upstream("localhost:8000/v1")


def test_slow_upstream_times_out(fake):
    fake.default = "slow"
    start = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match=r"after 2 tries \(last: timed out"):
        _run(Upstream(fake.url, timeout_s=0.2, retries=1, backoff_s=0.01), lambda u: u.chat(BODY))
    assert time.monotonic() - start < 1.5


def test_500_then_ok_is_retried_with_backoff(fake):
    fake.script = [500, 503]
    assert _run(Upstream(fake.url, retries=2, backoff_s=0.1), lambda u: u.chat(BODY)) == ANSWER
    gaps = [b["at"] - a["at"] for a, b in zip(fake.seen, fake.seen[1:])]
    assert len(fake.seen) == 3
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19  # 0.1 s, then 0.2 s


def test_stream_retries_before_the_first_chunk(fake):
    fake.script = [502, 429]
    chunks = _run(Upstream(fake.url, retries=2, backoff_s=0.01), _collect)
    assert len(chunks) == 2 and len(fake.seen) == 3


def test_always_500_raises_unavailable_without_the_key(fake, monkeypatch, caplog):
    monkeypatch.setenv("SLIMLM_TEST_KEY", KEY)
    fake.default = 500
    caplog.set_level(logging.DEBUG)
    for call in (lambda u: u.chat(BODY), _collect):
        with pytest.raises(UpstreamUnavailable) as info:
            _run(Upstream(fake.url, api_key_env="SLIMLM_TEST_KEY", retries=2, backoff_s=0.01), call)
        assert "after 3 tries (last: HTTP 500)" in str(info.value)
        assert KEY not in str(info.value) and KEY not in repr(info.value)
    assert len(fake.seen) == 6
    assert KEY not in caplog.text and "retrying" in caplog.text


def test_client_errors_are_not_retried_and_are_scrubbed(fake, monkeypatch):
    monkeypatch.setenv("SLIMLM_TEST_KEY", KEY)
    fake.default = 401  # the fake echoes the Authorization header in its error body
    for call in (lambda u: u.chat(BODY), _collect):
        with pytest.raises(UpstreamError) as info:
            _run(Upstream(fake.url, api_key_env="SLIMLM_TEST_KEY", retries=3, backoff_s=0.01), call)
        assert not isinstance(info.value, UpstreamUnavailable) and info.value.status_code == 401
        assert "HTTP 401" in str(info.value) and "API key" in str(info.value)
        assert KEY not in str(info.value) and "Bearer ***" in str(info.value)
    assert len(fake.seen) == 2


def test_refused_connection_is_unavailable():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for call in (lambda u: u.chat(BODY), _collect):
        with pytest.raises(UpstreamUnavailable, match="connection refused"):
            _run(Upstream(f"http://127.0.0.1:{port}/v1", retries=1, backoff_s=0.01), call)


def test_a_stream_that_breaks_midway_is_not_replayed(fake):
    fake.script = ["break"]
    received = []

    async def consume(upstream):
        async for chunk in upstream.stream(BODY):
            received.append(chunk)

    with pytest.raises(UpstreamUnavailable, match="after 1 chunks without finishing"):
        _run(Upstream(fake.url, retries=2, backoff_s=0.01), consume)
    assert len(received) == 1 and len(fake.seen) == 1  # the client already has a chunk: no retry
