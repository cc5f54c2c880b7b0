"""The cascade's way of answering: the small model writes its first tokens, held back; its own
token log-probs then decide whether it goes on or the large model answers instead.

Nothing has been sent yet either way, so a streaming client gets one answer from one model, and
a confident small model costs no extra latency beyond the buffered tokens. Going on locally
continues from the held-back tokens in a second job (`Continued` reads the two as one), so
nothing is generated twice. The cascade policy (policies.py) calls `answer_cascade` for each
request it deferred.
"""

from __future__ import annotations

import time
from dataclasses import replace

from slimlm.serve.engine import Result, Task, TokenLogprob
from slimlm.serve.large import headers
from slimlm.serve.types import APIError, Decision


async def answer_cascade(hybrid, server, call, task: Task, decision: Decision, policy):
    """The small model's first tokens, held back; then `policy` (a routing.CascadePolicy) reads
    their log-probs and picks who answers. Going on locally continues from those tokens in a
    second job, so nothing is generated twice. `hybrid` escalates (hybrid.Hybrid.escalate)."""
    need = 5 if policy.metric == "entropy" else 0
    probe = replace(task, params=replace(task.params, max_tokens=min(policy.first_n, task.params.max_tokens)),
                    logprobs=max(call.logprobs or 0, need))
    job = server.queue(call.engine, [probe], call.adapter)
    pieces, first = [], None
    async for kind, payload in job:
        if kind == "token":
            pieces.append(payload[1])
        else:
            first = payload
    if first is None:
        raise APIError(499, "the client closed the request", code="client_closed_request")
    lps = first.logprobs or []
    verdict = policy.should_escalate([t.logprob for t in lps], [[v for _, v in t.top] for t in lps] if need else None)
    decided_at = time.perf_counter()
    if verdict.route == "large":
        answered = await hybrid.escalate(server, call, replace(decision, route="large", reason=verdict.reason,
                                                              label="cascade"))
        if not isinstance(answered, str):
            return answered
        local = Decision("local-fallback", answered, privacy=decision.privacy)
    else:
        local = Decision("local", verdict.reason, privacy=decision.privacy)
    second, limit = None, task.params.max_tokens
    if first.text and first.finish_reason == "length" and first.completion_tokens < limit:
        ids = task.ids + call.engine.scoring.scorer().encode(first.text)
        room = min(limit - first.completion_tokens, call.engine.context - len(ids))
        if room > 0:
            rest = replace(task, ids=ids, params=replace(task.params, max_tokens=room), logprobs=call.logprobs)
            second = server.queue(call.engine, [rest], call.adapter)
    joined = Continued(job, first, pieces, second, call.logprobs, decided_at if call.stream else None)

    def record(_job=None):
        server.record(endpoint=call.endpoint, model=call.model, decision=local, started=call.started,
                      job=joined, model_large=hybrid.large_name)

    if second is None:
        record()
    else:
        second.on_done.append(record)
    return await call.respond(joined, call.model, headers(local))


class Continued:
    """One answer written by two jobs, read like one Job by the response builders in routes.py:
    the cascade's held-back first tokens (from `first_job`, finished), then `second`'s."""

    def __init__(self, first_job, first: Result, pieces: list[str], second, keep: int | None,
                 shown_at: float | None) -> None:
        self.first_job, self.first, self.pieces, self.second = first_job, first, pieces, second
        self.keep, self.shown_at = keep, shown_at

    prompt_tokens = property(lambda self: self.first.prompt_tokens)
    completion_tokens = property(lambda self: self.first_job.completion_tokens
                                 + (self.second.completion_tokens if self.second else 0))
    first_token_at = property(lambda self: self.shown_at or self.first_job.first_token_at)
    finished_at = property(lambda self: (self.second or self.first_job).finished_at)
    status = property(lambda self: (self.second or self.first_job).status)

    def cancel(self) -> None:
        if self.second is not None:
            self.second.cancel()

    async def __aiter__(self):
        for piece in self.pieces:
            yield "token", (0, piece)
        if self.second is None:
            yield "result", self._merged(None)
            return
        async for kind, payload in self.second:
            yield (kind, payload) if kind == "token" else ("result", self._merged(payload))

    async def results(self) -> list[Result]:
        return [payload async for kind, payload in self if kind == "result"]

    def _merged(self, rest: Result | None) -> Result:
        first, lps = self.first, None
        if self.keep is not None:  # the probe may have asked for more alternatives than the client
            lps = [TokenLogprob(t.token, t.logprob, t.top[:self.keep], t.raw) for t in first.logprobs or []]
            lps += (rest.logprobs or []) if rest else []
        if rest is None:
            return replace(first, logprobs=lps)
        return Result(first.index, first.text + rest.text, rest.finish_reason, first.prompt_tokens,
                      first.completion_tokens + rest.completion_tokens, None, lps)
