"""The OpenAI wire format: request models (pydantic, strict) and response shapes (plain dicts).

Requests are validated strictly ("5" is not a number, 1 is not a boolean) so a client bug shows
up as a 400 naming the field, not as a silently coerced value. Unknown fields are kept (clients
send many, and a router may forward the body upstream) but otherwise ignored. Responses are
built by hand as dicts in exactly OpenAI's shape, which is what client libraries and
lm-evaluation-harness parse.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from slimlm.serve.engine import TokenLogprob


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        """The message for the chat template: text parts joined, 'developer' as 'system'."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)  # None: OpenAI's default, 1
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stop if s]


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a string, or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


# -- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse(obj: dict) -> str:
    """One server-sent event, as OpenAI frames them."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _entry(token: str, logprob: float, raw: bytes | None = None) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(raw if raw is not None else token.encode("utf-8"))}


def chat_logprobs(tokens: list[TokenLogprob] | None) -> dict | None:
    if tokens is None:
        return None
    return {"content": [{**_entry(t.token, t.logprob if t.logprob is not None else 0.0, t.raw),
                         "top_logprobs": [_entry(tok, lp) for tok, lp in t.top]} for t in tokens],
            "refusal": None}


def legacy_logprobs(tokens: list[TokenLogprob], start_offset: int = 0) -> dict:
    """The completions API's `logprobs` object. Each `top_logprobs` entry holds the k most likely
    tokens plus the chosen one (as vLLM does), so a client can tell whether it was the greedy
    pick; the first prompt token's entries are null, as OpenAI's."""
    offsets, at = [], start_offset
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    tops = []
    for t in tokens:
        if t.logprob is None:
            tops.append(None)
            continue
        top = dict(t.top)
        top.setdefault(t.token, t.logprob)
        tops.append(top)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops, "text_offset": offsets}


def chat_response(rid: str, model: str, text: str, finish: str, logprobs: dict | None, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": logprobs, "finish_reason": finish}],
            "usage": use, "system_fingerprint": None}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None, logprobs: dict | None = None,
               created: int | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created or int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_response(rid: str, model: str, choices: list[dict], use: dict | None,
                        obj: str = "text_completion") -> dict:
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "system_fingerprint": None}
    if use is not None:
        body["usage"] = use
    return body


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def public_finish(reason: str) -> str:
    """Engine finish reasons as OpenAI names them ('cancelled' never reaches a client)."""
    return "stop" if reason == "stop" else "length"
