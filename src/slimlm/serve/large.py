"""The large model's side of hybrid routing: opening it (`open_large`), asking it over HTTP
(`Remote`, `ask_remote`), and giving back what the privacy guard took out of a request
(`Restorer`).

`--large` is either an http(s) URL, any OpenAI-compatible API (a cloud API, vLLM, Ollama, a
second `slimlm serve`), or a model on this machine, loaded as a second engine in this process.
Upstream (upstream.py) speaks /chat/completions, with retries, backoff and a key that never
shows; completions reuse all of that through a second client whose transport sends the same
requests to /completions.
"""

from __future__ import annotations

import inspect
import re
import time

from fastapi.responses import JSONResponse

from slimlm.data.privacy import PrivacyGuard
from slimlm.errors import SlimlmError
from slimlm.serve import schemas as S

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
_PARTIAL = re.compile(r"\[[A-Z_]*\d*$")  # what may still grow into a placeholder such as [EMAIL_1]
_LONGEST_PLACEHOLDER = 24


def is_url(spec: str) -> bool:
    return bool(re.match(r"^https?://", spec or ""))


def open_large(spec: str, *, api_key_env: str | None = None, timeout_s: float = 30.0, retries: int = 2,
               backend: str = "auto", n_ctx: int | None = None, queue_size: int = 16):
    """A Remote for a URL, else an Engine for a local model (served as the large one)."""
    if is_url(spec):
        return Remote.open(spec, api_key_env, timeout_s=timeout_s, retries=retries)
    if api_key_env:
        raise SlimlmError("--large-api-key-env is for a --large URL: a large model on this machine needs no key")
    from slimlm.serve.engine import Engine

    return Engine.open(spec, backend, queue_size=queue_size, n_ctx=n_ctx)


def _to_completions():
    """An httpx transport that sends /chat/completions requests to /completions instead."""
    import httpx

    class ToCompletions(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self._inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request):
            path = request.url.path
            if path.endswith("/chat/completions"):
                request.url = request.url.copy_with(path=path[:-len("/chat/completions")] + "/completions")
            return await self._inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self._inner.aclose()

    return ToCompletions()


class Remote:
    """A large model behind an OpenAI-compatible API: `chat` answers /v1/chat/completions and
    `completions` (optional) /v1/completions; each has `await chat(body)` and `stream(body)`."""

    remote = True

    def __init__(self, chat, completions=None) -> None:
        self.chat, self.completions = chat, completions

    @classmethod
    def open(cls, url: str, api_key_env: str | None = None, **kwargs) -> Remote:
        from slimlm.serve.upstream import Upstream

        return cls(Upstream(url, api_key_env, **kwargs), Upstream(url, api_key_env, transport=_to_completions(),
                                                                  **kwargs))

    def client(self, endpoint: str):
        return self.chat if endpoint == CHAT else self.completions

    async def aclose(self) -> None:
        for client in (self.chat, self.completions):
            if hasattr(client, "aclose"):
                await client.aclose()

    def __repr__(self) -> str:  # Upstream's repr never holds the key
        return f"Remote({self.chat!r})"


def _slot(choice: dict, endpoint: str, stream: bool) -> tuple[dict | None, str]:
    """Where a choice keeps its text: (the dict holding it, its key)."""
    if endpoint == COMPLETIONS:
        return choice, "text"
    holder = choice.setdefault("delta", {}) if stream else choice.get("message")
    return (holder if isinstance(holder, dict) else None), "content"


def restore_answer(answer: dict, endpoint: str, mapping: dict[str, str]) -> dict:
    """A whole (non-streamed) answer with the redacted values put back, in place."""
    if not mapping:
        return answer
    for choice in answer.get("choices") or []:
        holder, key = _slot(choice, endpoint, stream=False)
        if holder is not None and isinstance(holder.get(key), str):
            holder[key] = PrivacyGuard.restore(holder[key], mapping)
    return answer


class Restorer:
    """Puts redacted values back into a streamed answer. A placeholder may arrive split across
    chunks ("... [EMA", "IL_1] ..."), so a tail that could still become one is held back until
    it is complete, cannot be one any more, or the choice finishes."""

    def __init__(self, mapping: dict[str, str], endpoint: str) -> None:
        self.mapping, self.endpoint = mapping, endpoint
        self._held: dict[int, str] = {}

    def feed(self, index: int, text: str) -> str:
        text = self._held.get(index, "") + text
        m = _PARTIAL.search(text)
        cut = m.start() if m and len(text) - m.start() <= _LONGEST_PLACEHOLDER else len(text)
        self._held[index] = text[cut:]
        return PrivacyGuard.restore(text[:cut], self.mapping)

    def flush(self, index: int) -> str:
        return PrivacyGuard.restore(self._held.pop(index, ""), self.mapping)

    def chunk(self, chunk: dict) -> None:
        """Restore one chunk in place."""
        for choice in chunk.get("choices") or []:
            holder, key = _slot(choice, self.endpoint, stream=True)
            if holder is None:
                continue
            index = choice.get("index", 0)
            text = self.feed(index, holder[key] if isinstance(holder.get(key), str) else "")
            if choice.get("finish_reason"):
                text += self.flush(index)
            if text or key in holder:
                holder[key] = text

    def held(self) -> bool:
        return any(self._held.values())

    def closing(self, like: dict) -> dict:
        """A last chunk with whatever is still held (for a stream that ended unfinished)."""
        choices = []
        for index in [i for i, text in self._held.items() if text]:
            text = self.flush(index)
            choices.append({"index": index, "text": text, "finish_reason": None} if self.endpoint == COMPLETIONS
                           else {"index": index, "delta": {"content": text}, "finish_reason": None})
        return {**{k: like[k] for k in ("id", "object", "created", "model") if k in like}, "choices": choices}


# -- asking the remote model ---------------------------------------------------------------------
def headers(decision) -> dict:
    """x-slimlm-route and x-slimlm-reason (one line of ASCII, as HTTP headers must be)."""
    reason = re.sub(r"\s+", " ", decision.reason).encode("ascii", "replace").decode()[:300]
    return {"x-slimlm-route": decision.route, "x-slimlm-reason": reason}


def fell_back(decision, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{decision.reason}; the large model failed ({type(exc).__name__}: {first}), answered locally"


def outgoing(call, decision, guard, large_name: str | None) -> tuple[dict, dict[str, str]]:
    """The body for the remote model (redacted if the guard said so), and the placeholders."""
    body = {k: v for k, v in call.body.items() if k != "slimlm"}
    if large_name:
        body["model"] = large_name
    if call.stream:  # the ledger wants the token counts; dropped again unless the client asked
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    mapping: dict[str, str] = {}
    if decision.redact:
        if call.endpoint == CHAT:
            body["messages"], mapping = guard.redact_messages(body["messages"])
        else:
            body["prompt"], mapping = guard.redact(body["prompt"])
    return body, mapping


async def ask_remote(server, call, decision, remote: Remote, guard, large_name: str | None, large: bool = True):
    """The remote model's answer as a response, or, if it failed before answering, a string
    saying why (the caller then answers locally). Streams are relayed chunk by chunk. `large`:
    the remote is the large model (False: an external engine serving as the small one)."""
    client = remote.client(call.endpoint)
    if client is None:
        return f"{decision.reason}; the large model answers chat only, answered locally"
    body, mapping = outgoing(call, decision, guard, large_name)
    try:
        if not call.stream:
            answer = await client.chat(body)
        else:
            chunks = client.stream(body)
            if inspect.isawaitable(chunks):  # an async def returning an iterator
                chunks = await chunks
            chunks = chunks.__aiter__()
            first = await chunks.__anext__()
    except Exception as exc:  # noqa: BLE001 - any upstream failure falls back to the local model
        return fell_back(decision, exc)
    if not call.stream:
        restore_answer(answer, call.endpoint, mapping)
        use = answer.get("usage") or {}
        server.record(endpoint=call.endpoint, model=call.model, decision=decision, started=call.started,
                      tokens=(use.get("prompt_tokens", 0), use.get("completion_tokens", 0)),
                      model_large=(answer.get("model") or large_name) if large else None)
        return JSONResponse(answer, headers=headers(decision))
    return server.stream(_relay(server, call, decision, first, chunks, mapping, large_name, large),
                         headers=headers(decision))


async def _relay(server, call, decision, first: dict, chunks, mapping: dict, large_name: str | None,
                 large: bool = True):
    wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    restorer = Restorer(mapping, call.endpoint)
    use, status, first_at, chunk = {}, "cancelled", time.perf_counter(), first
    try:
        while chunk is not None:
            use = chunk.get("usage") or use
            if mapping:
                restorer.chunk(chunk)
            if chunk.get("choices") or wants_usage:  # a usage-only chunk only when asked for
                yield S.sse(chunk)
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                chunk = None
        if restorer.held():  # a stream that ended without a finish_reason
            yield S.sse(restorer.closing(first))
        yield S.SSE_DONE
        status = "ok"
    except Exception:
        status = "error"
        raise
    finally:
        server.record(endpoint=call.endpoint, model=call.model, decision=decision, started=call.started,
                      tokens=(use.get("prompt_tokens", 0), use.get("completion_tokens", 0)), status=status,
                      model_large=(first.get("model") or large_name) if large else None, first_token_at=first_at)
