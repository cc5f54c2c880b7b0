"""POST /v1/chat/completions and POST /v1/completions, in OpenAI's request and response shapes.

Both check everything they can (model, limits, prompt length) before queueing, so a bad request
costs no model time and fails with a 4xx naming the field. Chat requests go through the router
first: a "large" decision is answered by the router's upstream, and if the upstream fails
before answering, the local model answers instead (route "local-fallback"), so a flaky large
model degrades quality rather than availability. Completions are always local: they are what
evaluation harnesses send, and scoring must come from the model being evaluated.
"""

from __future__ import annotations

import inspect
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from slimlm.serve import schemas as S
from slimlm.serve.api import APIError, Decision, Server
from slimlm.serve.engine import Job, Result, Task

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def add_routes(app: FastAPI, server: Server) -> None:
    @app.post(CHAT)
    async def chat_completions(body: S.ChatRequest, request: Request):
        return await chat(server, body, request)

    @app.post(COMPLETIONS)
    async def completions(body: S.CompletionRequest, request: Request):
        return await complete(server, body, request)


def _gone() -> APIError:
    return APIError(499, "the client closed the request", code="client_closed_request")


async def chat(server: Server, body: S.ChatRequest, request: Request):
    started = time.perf_counter()
    engine, adapter = server.resolve(body.model)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = server.params(body, server.max_tokens(requested, server.config.default_max_tokens, minimum=1))
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    if body.logprobs and not engine.supports_logprobs:
        raise APIError(400, f"the {engine.backend.name} backend cannot give log-probabilities", "logprobs")
    messages = [m.as_dict() for m in body.messages]
    raw = body.model_dump(exclude_unset=True)
    decision = await server.decide("\n".join(m["content"] for m in messages), raw)
    if decision.route == "large":
        answered = await _escalate(server, raw, decision, body.model, started, bool(body.stream))
        if not isinstance(answered, str):
            return answered
        decision = Decision("local-fallback", answered)
    ids = engine.chat_ids(messages)
    server.check_prompt(engine, ids, True, "messages")
    task = Task(ids, params, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    job = server.submit(engine, [task], adapter, endpoint=CHAT, model=body.model, decision=decision, started=started)
    rid = S.new_id("chatcmpl")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        return server.stream(_chat_frames(job, rid, body.model, include_usage, bool(body.logprobs)), job)
    results = await server.collect(job, request)
    if not results:
        raise _gone()
    res = results[0]
    return S.chat_response(rid, body.model, res.text, S.public_finish(res.finish_reason),
                           S.chat_logprobs(res.logprobs or []) if body.logprobs else None,
                           S.usage(res.prompt_tokens, res.completion_tokens))


async def _chat_frames(job: Job, rid: str, model: str, include_usage: bool, logprobs: bool):
    created = int(time.time())
    yield S.sse(S.chat_chunk(rid, model, {"role": "assistant", "content": ""}, created=created))
    final: Result | None = None
    async for kind, payload in job:
        if kind == "token":
            yield S.sse(S.chat_chunk(rid, model, {"content": payload[1]}, created=created))
        else:
            final = payload
    if final is None:
        return
    yield S.sse(S.chat_chunk(rid, model, {}, S.public_finish(final.finish_reason),
                             S.chat_logprobs(final.logprobs or []) if logprobs else None, created=created))
    if include_usage:
        yield S.sse(S.usage_chunk(rid, model, "chat.completion.chunk",
                                  S.usage(final.prompt_tokens, final.completion_tokens)))
    yield S.SSE_DONE


async def _escalate(server: Server, body: dict, decision: Decision, model: str, started: float, stream: bool):
    """The upstream's answer as a response, or, if it failed before answering, a string saying
    why (the caller then answers locally)."""
    upstream = getattr(server.router, "upstream", None)
    if upstream is None:
        raise APIError(503, "the router sent this request to the large model, but no upstream is configured",
                       code="no_upstream", type_="server_error")
    try:
        if not stream:
            answer = await upstream.chat(body)
            use = answer.get("usage") or {}
            server.record(endpoint=CHAT, model=model, route="large", reason=decision.reason, started=started,
                          tokens=(use.get("prompt_tokens", 0), use.get("completion_tokens", 0)),
                          model_large=answer.get("model"), first_token_at=None)
            return JSONResponse(answer)
        chunks = upstream.stream(body)
        if inspect.isawaitable(chunks):  # an async def returning an iterator, rather than an async generator
            chunks = await chunks
        chunks = chunks.__aiter__()
        first = await chunks.__anext__()
    except Exception as exc:  # noqa: BLE001 - any upstream failure falls back to the local model
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{decision.reason}; the large model failed ({type(exc).__name__}: {first_line}), answered locally"
    first_at = time.perf_counter()

    async def frames():
        chunk, use, status = first, {}, "cancelled"
        try:
            while True:
                use = chunk.get("usage") or use
                yield S.sse(chunk)
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
            yield S.SSE_DONE
            status = "ok"
        except Exception:
            status = "error"
            raise
        finally:
            server.record(endpoint=CHAT, model=model, route="large", reason=decision.reason, started=started,
                          tokens=(use.get("prompt_tokens", 0), use.get("completion_tokens", 0)), status=status,
                          model_large=first.get("model"), first_token_at=first_at)

    return server.stream(frames())


async def complete(server: Server, body: S.CompletionRequest, request: Request):
    started = time.perf_counter()
    engine, adapter = server.resolve(body.model)
    prompts = body.prompts()
    if not prompts:
        raise APIError(400, "prompt is empty: give a string, a list of strings, or token ids", "prompt",
                       "empty_prompt")
    params = server.params(body, server.max_tokens(body.max_tokens, 16))  # 16: OpenAI's default here
    if body.logprobs is not None and not engine.supports_logprobs:
        raise APIError(400, f"the {engine.backend.name} backend cannot give log-probabilities", "logprobs")
    echo_scoring = bool(body.echo) and body.logprobs is not None
    tasks, texts = [], []
    for i, prompt in enumerate(prompts):
        ids = (engine.text_ids(prompt) if prompt else []) if isinstance(prompt, str) else list(prompt)
        server.check_prompt(engine, ids, params.max_tokens >= 1, "prompt")
        texts.append(prompt if isinstance(prompt, str) else engine.decode(ids))
        tasks.append(Task(ids, params, logprobs=body.logprobs, echo_logprobs=echo_scoring, index=i))
    job = server.submit(engine, tasks, adapter, endpoint=COMPLETIONS, model=body.model,
                        decision=Decision("local", "completions are served locally"), started=started)
    rid = S.new_id("cmpl")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return server.stream(_completion_frames(job, rid, body, texts, include_usage), job)
    results = sorted(await server.collect(job, request), key=lambda r: r.index)
    if len(results) != len(tasks):
        raise _gone()
    choices = [S.completion_choice(r.index, (texts[r.index] if body.echo else "") + r.text,
                                   S.public_finish(r.finish_reason), _legacy(r, body, texts[r.index]))
               for r in results]
    return S.completion_response(rid, body.model, choices, S.usage(sum(r.prompt_tokens for r in results),
                                                                   sum(r.completion_tokens for r in results)))


def _legacy(res: Result, body: S.CompletionRequest, prompt_text: str) -> dict | None:
    if body.logprobs is None:
        return None
    if body.echo:
        return S.legacy_logprobs((res.prompt_logprobs or []) + (res.logprobs or []), 0)
    return S.legacy_logprobs(res.logprobs or [], len(prompt_text))


async def _completion_frames(job: Job, rid: str, body: S.CompletionRequest, texts: list[str], include_usage: bool):
    def frame(index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        return S.sse(S.completion_response(rid, body.model, [S.completion_choice(index, text, finish, logprobs)], None))

    if body.echo:
        for i, text in enumerate(texts):
            yield frame(i, text)
    prompt_tokens = completion_tokens = 0
    async for kind, payload in job:
        if kind == "token":
            yield frame(*payload)
            continue
        prompt_tokens += payload.prompt_tokens
        completion_tokens += payload.completion_tokens
        yield frame(payload.index, "", S.public_finish(payload.finish_reason),
                    _legacy(payload, body, texts[payload.index]))
    if include_usage:
        yield S.sse(S.usage_chunk(rid, body.model, "text_completion", S.usage(prompt_tokens, completion_tokens)))
    yield S.SSE_DONE
