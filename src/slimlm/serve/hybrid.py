"""Hybrid routing: which model answers each request, and what may leave the machine.

For each chat or completion request, in this order:
1. requests only the small model can answer (scoring with echo or max_tokens 0, token-id
   prompts, several prompts at once) stay local;
2. the body field `"slimlm": {"route": "local" | "large" | "auto"}` overrides the policy for
   this request (the openai client sends it with `extra_body={"slimlm": {"route": "large"}}`);
3. the policy (ServeConfig.policy, or a Router hook) decides: `local`, `large`, `learned` (from
   the prompt, before anything is generated) or `cascade`: the small model writes its first N
   tokens, held back, and its own token log-probs decide whether it goes on or the large model
   answers. Nothing has been sent yet either way, so a streaming client gets one answer from
   one model, and a confident small model costs no extra latency beyond N buffered tokens;
4. before a request goes to a remote URL the privacy guard scans it: mode `local` keeps
   requests holding personal data or secrets on this machine (this wins over the override),
   mode `redact` sends typed placeholders and puts the values back into the answer, also when
   a placeholder arrives split across stream chunks. A large model on this machine is not
   guarded: nothing leaves.
If the large model fails before it answers, the small one does (route `local-fallback`), so a
flaky large model costs quality, never availability. Every response names its route and reason
in the `x-slimlm-route` and `x-slimlm-reason` headers, and every request becomes one record.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.serve.api import APIError, Decision
from slimlm.serve.engine import Engine, Result, Task, TokenLogprob
from slimlm.serve.large import CHAT, Remote, ask_remote, fell_back, headers

log = logging.getLogger("slimlm.serve")
ROUTES = ("local", "large", "auto")


@dataclass
class Call:
    """One request, as routes.py hands it over: what the router and the privacy guard read,
    and how to run and answer it on any local engine."""

    endpoint: str
    model: str  # as the client named it
    body: dict  # as sent; forwarded to a remote large model (less the "slimlm" field)
    text: str  # the prompt's text
    stream: bool
    started: float
    engine: Engine  # the small model
    adapter: str | None
    tasks: Callable[[Engine], list[Task]]  # the request as checked tasks for an engine
    respond: Callable[[Any, str, dict], Awaitable[Any]]  # (job, model name, headers) -> response
    logprobs: int | None = None  # top-k per token the client asked for; None: no log-probs
    local_only: str | None = None  # why only the small model can answer this one


def requested_route(body: dict) -> str | None:
    """The per-request override: "local", "large", or None (the policy decides)."""
    ext = body.get("slimlm")
    if ext is None:
        return None
    route = ext.get("route", "auto") if isinstance(ext, dict) else None
    if route not in ROUTES:
        raise APIError(400, f"slimlm.route must be one of {', '.join(ROUTES)} (send e.g. "
                       '"slimlm": {"route": "local"})', "slimlm", "invalid_value")
    return None if route == "auto" else route


async def _ask(router, text: str, body: dict) -> Decision:
    """A policy's or hook's decision; a failing one answers locally (private, always there)."""
    decide = router.decide
    try:  # a policy that decides from the prompt alone may take just the text
        one_arg = len(inspect.signature(decide).parameters) == 1
    except (TypeError, ValueError):
        one_arg = False
    try:
        if getattr(router, "name", None) == "learned":  # an encoder forward pass: off the event loop
            decision = await asyncio.to_thread(decide, text)
        else:
            decision = decide(text) if one_arg else decide(text, body)
            if inspect.isawaitable(decision):
                decision = await decision
    except Exception as exc:  # noqa: BLE001 - local is the safe side
        log.exception("the router failed")
        return Decision("local", f"the router failed ({type(exc).__name__}), answered locally")
    if decision.route not in ("local", "large"):
        raise APIError(500, f"the router chose route {decision.route!r}: routes are 'local' and 'large'",
                       type_="server_error")
    label = f"policy {router.name}" if getattr(router, "name", None) in ("large", "learned") else None
    return Decision(decision.route, decision.reason, label=label)


class Hybrid:
    """The routing of one server: a policy or hook, the large model, the privacy guard."""

    def __init__(self, policy, hook, large, guard, large_name: str | None) -> None:
        self.policy, self.hook, self.large, self.guard, self.large_name = policy, hook, large, guard, large_name

    @classmethod
    def build(cls, config, hook=None, large=None) -> Hybrid:
        from slimlm.serve.privacy import PrivacyGuard
        from slimlm.serve.router import CascadePolicy, LargePolicy, LearnedRouter, LocalPolicy

        policy = None
        if hook is not None:
            upstream = getattr(hook, "upstream", None)
            large = Remote(upstream) if upstream is not None else large
        elif config.policy == "local":
            policy = LocalPolicy()
        elif large is None:
            raise SlimlmError(f"--policy {config.policy} sends requests to a large model: name one with "
                              "--large MODEL_OR_URL, or use --policy local")
        elif config.policy == "large":
            policy = LargePolicy()
        elif config.policy == "cascade":
            policy = CascadePolicy(config.cascade_threshold, config.cascade_metric, config.cascade_first_n)
        else:
            policy = LearnedRouter.load(config.router_path)
            policy.decide("warm-up")  # loads the encoder now, not on the first request
        remote = large is not None and not isinstance(large, Engine)
        guard = PrivacyGuard(config.privacy) if remote and config.privacy != "off" else None
        name = large.name if isinstance(large, Engine) else config.large_name
        return cls(policy, hook, large, guard, name)

    # -- deciding ----------------------------------------------------------------------------
    async def choose(self, call: Call) -> Decision:
        """local, large, or cascade (decided after the small model's first tokens)."""
        wanted = requested_route(call.body)
        if call.local_only:
            return Decision("local", call.local_only)
        if wanted == "local":
            return Decision("local", "the request asked for route 'local'")
        if wanted == "large":
            if self.large is None:
                raise APIError(400, "the request asked for route 'large', but this server has no large model: "
                               "start it with --large MODEL_OR_URL", "slimlm", "no_large_model")
            decision = Decision("large", "the request asked for route 'large'", label="request")
        elif self.hook is not None:
            if call.endpoint != CHAT:
                return Decision("local", "completions are answered locally (the router hook routes chat)")
            decision = await _ask(self.hook, call.text, call.body)
        elif self.policy.name == "cascade":
            decision = Decision("cascade", "cascade")
        else:
            decision = await _ask(self.policy, call.text, call.body)
        return decision if decision.route == "local" else await self._guarded(call, decision)

    async def _guarded(self, call: Call, decision: Decision) -> Decision:
        """The privacy guard's verdict on a request about to leave the machine (scanned off the
        event loop: validating candidates in a long prompt takes a while)."""
        if self.guard is None:
            return decision
        found = await asyncio.to_thread(self.guard.check, call.text)
        if not found.kinds:
            return replace(decision, privacy=f"{self.guard.mode}: nothing found")
        privacy = f"{self.guard.mode}: {', '.join(found.kinds)}"
        if not found.allowed_to_leave:
            return Decision("local", f"privacy: {found.reason}", privacy)
        return replace(decision, privacy=privacy, redact=True)

    # -- answering ---------------------------------------------------------------------------
    async def answer(self, server, call: Call):
        tasks = call.tasks(call.engine)  # a bad request fails here, whatever the route
        decision = await self.choose(call)
        if decision.route == "cascade":
            return await self._cascade(server, call, tasks[0], decision)
        if decision.route == "large":
            answered = await self._escalate(server, call, decision)
            if not isinstance(answered, str):
                return answered
            decision = Decision("local-fallback", answered, decision.privacy)
        job = server.submit(call.engine, tasks, call.adapter, endpoint=call.endpoint, model=call.model,
                            decision=decision, started=call.started, model_large=self.large_name)
        return await call.respond(job, call.model, headers(decision))

    async def _cascade(self, server, call: Call, task: Task, decision: Decision):
        """The small model's first tokens, held back; then its log-probs pick who answers. Going
        on locally continues from those tokens in a second job, so nothing is generated twice."""
        policy = self.policy
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
            answered = await self._escalate(server, call, replace(decision, route="large", reason=verdict.reason,
                                                                  label="cascade"))
            if not isinstance(answered, str):
                return answered
            local = Decision("local-fallback", answered, decision.privacy)
        else:
            local = Decision("local", verdict.reason, decision.privacy)
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
                          job=joined, model_large=self.large_name)

        if second is None:
            record()
        else:
            second.on_done.append(record)
        return await call.respond(joined, call.model, headers(local))

    async def _escalate(self, server, call: Call, decision: Decision):
        """The large model's answer as a response, or, if it failed before answering, a string
        saying why (the caller then answers locally)."""
        large = self.large
        if large is None:
            raise APIError(503, "the router sent this request to the large model, but no upstream is configured",
                           code="no_upstream", type_="server_error")
        if isinstance(large, Engine):  # in-process: no privacy guard, nothing leaves the machine
            try:
                job = server.submit(large, call.tasks(large), None, endpoint=call.endpoint, model=call.model,
                                    decision=decision, started=call.started, model_large=large.name)
            except Exception as exc:  # noqa: BLE001 - its queue is full, or the prompt too long for it
                return fell_back(decision, exc)
            return await call.respond(job, large.name, headers(decision))
        return await ask_remote(server, call, decision, large, self.guard, self.large_name)


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


class LedgerWriter:
    """ServeConfig.on_record for a Ledger. Rows are written by a thread of their own, so a slow
    disk (each SQLite commit syncs) or a remote database never holds up the event loop. With
    `price_model` (a name in the API price table) every row is priced at that model's list
    price, which is what the local answers would have cost there."""

    def __init__(self, ledger, price_model: str | None = None) -> None:
        table = ledger.prices.get("models", {})
        if price_model is not None and price_model not in table:
            raise SlimlmError(f"--large-price-model {price_model!r} is not in the price table: choose one of "
                              f"{', '.join(sorted(table))}")
        self.ledger, self.price_model = ledger, price_model
        self._rows: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._write, name="slimlm-ledger", daemon=True)
        self._thread.start()

    def __call__(self, rec: dict) -> None:
        if self.price_model:
            from slimlm.serve.ledger import large_cost_usd

            rec = {**rec, "large_cost_usd": large_cost_usd(self.price_model, rec.get("tokens_in") or 0,
                                                           rec.get("tokens_out") or 0, self.ledger.prices)}
        self._rows.put(rec)

    def _write(self) -> None:
        while (rec := self._rows.get()) is not None:
            try:
                self.ledger.on_record(rec)
            except Exception:  # noqa: BLE001 - a broken ledger loses rows, not requests
                log.exception("could not write a ledger row")
            finally:
                self._rows.task_done()
        self._rows.task_done()

    def flush(self) -> None:
        """Wait until every row handed over so far is written."""
        self._rows.join()

    def close(self) -> None:
        self._rows.put(None)
        self._thread.join(30)
        self.ledger.close()
