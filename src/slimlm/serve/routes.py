"""POST /v1/chat/completions and POST /v1/completions, in OpenAI's request and response shapes.

Both check everything they can (model, limits, prompt length) before queueing, so a bad request
costs no model time and fails with a 4xx naming the field. Each request is then described as a
hybrid.Call (its text, how to run it on an engine, how to answer from a job) and routed by
hybrid.py: the small model, or the large one, with the small one answering if the large one
fails (route "local-fallback"). Completions that score text (echo, max_tokens 0) or send token
ids are always local: evaluation harnesses send them, and the numbers must come from the model
being evaluated.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from slimlm.serve import schemas as S
from slimlm.serve.engine import Engine, Job, Result, Task
from slimlm.serve.hybrid import Call
from slimlm.serve.large import CHAT, COMPLETIONS
from slimlm.serve.types import APIError


def add_routes(app: FastAPI, server) -> None:
    """The two completion routes on `app`, answered by `server` (the api.Server: not imported
    here, so that api.py may import this module without a cycle)."""

    @app.post(CHAT)
    async def chat_completions(body: S.ChatRequest, request: Request):
        return await chat(server, body, request)

    @app.post(COMPLETIONS)
    async def completions(body: S.CompletionRequest, request: Request):
        return await complete(server, body, request)


def _gone() -> APIError:
    return APIError(499, "the client closed the request", code="client_closed_request")


async def chat(server, body: S.ChatRequest, request: Request):
    started = time.perf_counter()
    engine, adapter = server.resolve(body.model)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = server.params(body, server.max_tokens(requested, server.config.default_max_tokens, minimum=1))
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    if body.logprobs and not engine.supports_logprobs:
        raise APIError(400, f"the {engine.backend.label} backend cannot give log-probabilities", "logprobs")
    messages = [m.as_dict() for m in body.messages]
    k = (body.top_logprobs or 0) if body.logprobs else None
    rid = S.new_id("chatcmpl")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def tasks(e: Engine) -> list[Task]:
        ids = e.chat_ids(messages)
        server.check_prompt(e, ids, True, "messages")
        return [Task(ids, params, logprobs=k)]

    async def respond(job, model: str, headers: dict):
        if body.stream:
            return server.stream(_chat_frames(job, rid, model, include_usage, bool(body.logprobs)), job, headers)
        results = await server.collect(job, request)
        if not results:
            raise _gone()
        res = results[0]
        return JSONResponse(S.chat_response(rid, model, res.text, S.public_finish(res.finish_reason),
                                            S.chat_logprobs(res.logprobs or []) if body.logprobs else None,
                                            S.usage(res.prompt_tokens, res.completion_tokens)), headers=headers)

    call = Call(CHAT, body.model, body.model_dump(exclude_unset=True), "\n".join(m["content"] for m in messages),
                bool(body.stream), started, engine, adapter, tasks, respond, k)
    return await server.hybrid.answer(server, call)


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


async def complete(server, body: S.CompletionRequest, request: Request):
    started = time.perf_counter()
    engine, adapter = server.resolve(body.model)
    prompts = body.prompts()
    if not prompts:
        raise APIError(400, "prompt is empty: give a string, a list of strings, or token ids", "prompt",
                       "empty_prompt")
    params = server.params(body, server.max_tokens(body.max_tokens, 16))  # 16: OpenAI's default here
    if body.logprobs is not None and not engine.supports_logprobs:
        raise APIError(400, f"the {engine.backend.label} backend cannot give log-probabilities", "logprobs")
    echo_scoring = bool(body.echo) and body.logprobs is not None
    rid = S.new_id("cmpl")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def tasks(e: Engine) -> list[Task]:
        out = []
        for i, prompt in enumerate(prompts):
            ids = (e.text_ids(prompt) if prompt else []) if isinstance(prompt, str) else list(prompt)
            server.check_prompt(e, ids, params.max_tokens >= 1, "prompt")
            out.append(Task(ids, params, logprobs=body.logprobs, echo_logprobs=echo_scoring, index=i))
        return out

    external = getattr(engine, "external", False)  # an --engine URL: it checks and reads the prompts itself
    small = [] if external else tasks(engine)  # checked (token ids in range) before the ids are decoded for echo
    texts = [p if isinstance(p, str) else ("" if external else engine.decode(list(p))) for p in prompts]

    async def respond(job, model: str, headers: dict):
        if body.stream:
            return server.stream(_completion_frames(job, rid, model, body, texts, include_usage), job, headers)
        results = sorted(await server.collect(job, request), key=lambda r: r.index)
        if len(results) != len(prompts):
            raise _gone()
        choices = [S.completion_choice(r.index, (texts[r.index] if body.echo else "") + r.text,
                                       S.public_finish(r.finish_reason), _legacy(r, body, texts[r.index]))
                   for r in results]
        use = S.usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))
        return JSONResponse(S.completion_response(rid, model, choices, use), headers=headers)

    local_only = None
    if len(prompts) != 1 or not isinstance(prompts[0], str):
        local_only = "token-id prompts and several prompts per request are answered by the small model"
    elif body.echo or params.max_tokens == 0:
        local_only = "scoring (echo, max_tokens 0) is answered by the model being scored"
    call = Call(COMPLETIONS, body.model, body.model_dump(exclude_unset=True), texts[0], bool(body.stream), started,
                engine, adapter, lambda e: small if e is engine else tasks(e), respond, body.logprobs, local_only)
    return await server.hybrid.answer(server, call)


def _legacy(res: Result, body: S.CompletionRequest, prompt_text: str) -> dict | None:
    if body.logprobs is None:
        return None
    if body.echo:
        return S.legacy_logprobs((res.prompt_logprobs or []) + (res.logprobs or []), 0)
    return S.legacy_logprobs(res.logprobs or [], len(prompt_text))


async def _completion_frames(job: Job, rid: str, model: str, body: S.CompletionRequest, texts: list[str],
                             include_usage: bool):
    def frame(index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        return S.sse(S.completion_response(rid, model, [S.completion_choice(index, text, finish, logprobs)], None))

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
        yield S.sse(S.usage_chunk(rid, model, "text_completion", S.usage(prompt_tokens, completion_tokens)))
    yield S.SSE_DONE
