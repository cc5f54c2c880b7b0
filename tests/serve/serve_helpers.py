"""Helpers of the server tests: a slow gated backend for timing behaviour (queueing,
cancellation), and a real uvicorn server on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

from slimlm.models.backends.base import Backend


class FakeBackend(Backend):
    """One 'x' per token, `delay` seconds apart, and only while `gate` is open: lets a test hold
    a request in the worker, or count how many tokens were made before a cancel took effect."""

    name = "fake"
    vocab_size = 256
    n_ctx = 512

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay, self.produced, self.gate = delay, 0, threading.Event()
        self.gate.set()

    @property
    def chat_template(self):
        return "fake"

    def render_chat(self, messages):
        return "\n".join(m["content"] for m in messages)

    def tokenize(self, text):
        return list(text.encode())

    def _stream_tokens(self, prompt_ids, params):
        for _ in range(params.max_tokens):
            if not self.gate.wait(10):
                raise RuntimeError("the test never opened the gate")
            time.sleep(self.delay)
            self._generated += 1
            self.produced += 1
            yield "x"


@contextmanager
def serving(app):
    """Run `app` under uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
