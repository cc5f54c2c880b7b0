"""Helpers of the server tests: a slow gated backend for timing behaviour (queueing,
cancellation), and a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from slimlm.models.backends.base import Backend


class FakeBackend(Backend):
    """One 'x' per token, `delay` seconds apart, and only while `gate` is open: lets a test hold
    a request in the worker, or count how many tokens were made before a cancel took effect."""

    name = "fake"
    vocab_size = 256
    context_length = 512

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

    def token_bytes(self, token):
        return bytes([token])

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


class FakeUpstream:
    """An OpenAI-compatible large model for the routing tests, served with `serving(fake.app())`.

    It answers "big: " + the last user message (or the prompt), so a test sees exactly what
    arrived, and streams in 3-character chunks, so a placeholder such as [EMAIL_1] arrives split.
    Every request is kept in `seen` (path, Authorization header, body). mode "ok"; "slow" waits
    `delay` seconds first; "fail" answers HTTP `status` with the Authorization header in the
    message (a careless upstream echoing the key must not get it into slimlm's logs).
    """

    def __init__(self, mode: str = "ok", delay: float = 0.0, status: int = 500,
                 models: tuple[str, ...] = ("big-model",)) -> None:
        self.mode, self.delay, self.status, self.seen, self.models = mode, delay, status, [], models

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]}

        async def answer(request: Request, chat: bool):
            body = await request.json()
            self.seen.append({"path": request.url.path, "auth": request.headers.get("authorization"), "body": body})
            if self.mode == "slow":
                await asyncio.sleep(self.delay)
            if self.mode == "fail":
                auth = request.headers.get("authorization")
                return JSONResponse({"error": {"message": f"upstream broke ({auth})"}}, status_code=self.status)
            asked = body["messages"][-1]["content"] if chat else body["prompt"]
            text, model = f"big: {asked}", body.get("model", "big-model")
            obj = "chat.completion" if chat else "text_completion"
            use = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}

            def choice(piece: str, finish=None) -> dict:
                if chat:
                    return {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}
                return {"index": 0, "text": piece, "finish_reason": finish}

            if not body.get("stream"):
                done = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        if chat else {"index": 0, "text": text, "finish_reason": "stop"})
                return {"id": "big-1", "object": obj, "created": 0, "model": model, "choices": [done], "usage": use}

            def frames():
                chunk = {"id": "big-1", "object": obj + (".chunk" if chat else ""), "created": 0, "model": model}
                for i in range(0, len(text), 3):
                    yield f"data: {json.dumps({**chunk, 'choices': [choice(text[i:i + 3])]})}\n\n"
                yield f"data: {json.dumps({**chunk, 'choices': [choice('', 'stop')]})}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': use})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(frames(), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await answer(request, True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await answer(request, False)

        return app


def closed_port_url() -> str:
    """A loopback URL nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
