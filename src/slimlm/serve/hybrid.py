"""Hybrid routing: which model answers each request, and what may leave the machine.

For each chat or completion request, in this order:
1. requests only the small model can answer (scoring with echo or max_tokens 0, token-id
   prompts, several prompts at once) stay local;
2. the body field `"slimlm": {"route": "local" | "large" | "auto"}` overrides the policy for
   this request (the openai client sends it with `extra_body={"slimlm": {"route": "large"}}`);
3. the policy (ServeConfig.policy, a class in policies.py's registry, or a Router hook) decides:
   `local`, `large`, `learned` (from the prompt, before anything is generated) or `cascade`
   (cascade.py): the small model writes its first N
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
import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.serve.engine import Engine, Task
from slimlm.serve.large import CHAT, Remote, ask_remote, fell_back, headers
from slimlm.serve.policies import DEFERRED, POLICY_REGISTRY, ask_hook
from slimlm.serve.types import APIError, Decision

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


class Hybrid:
    """The routing of one server: a policy or hook, the large model, the privacy guard."""

    def __init__(self, policy, hook, large, guard, large_name: str | None) -> None:
        self.policy, self.hook, self.large, self.guard, self.large_name = policy, hook, large, guard, large_name

    @classmethod
    def build(cls, config, hook=None, large=None) -> Hybrid:
        from slimlm.data.privacy import PrivacyGuard

        policy = None
        if hook is not None:
            upstream = getattr(hook, "upstream", None)
            large = Remote(upstream) if upstream is not None else large
        else:
            kind = POLICY_REGISTRY[config.policy]
            if kind.needs_large and large is None:
                raise SlimlmError(f"--policy {config.policy} sends requests to a large model: name one with "
                                  "--large MODEL_OR_URL, or use --policy local")
            policy = kind.build(config)
        remote = large is not None and not isinstance(large, Engine)
        guard = PrivacyGuard(config.privacy) if remote and config.privacy != "off" else None
        name = large.name if isinstance(large, Engine) else config.large_name
        return cls(policy, hook, large, guard, name)

    # -- deciding ----------------------------------------------------------------------------
    async def choose(self, call: Call) -> Decision:
        """local, large, or DEFERRED (the policy decides after the small model's first tokens)."""
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
            decision = await ask_hook(self.hook, call.text, call.body)
        else:
            decision = await self.policy.choose(call)
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
            return Decision("local", f"privacy: {found.reason}", privacy=privacy)
        return replace(decision, privacy=privacy, redact=True)

    # -- answering ---------------------------------------------------------------------------
    async def answer(self, server, call: Call):
        if getattr(call.engine, "external", False):
            return await self._answer_by_engine(server, call)
        tasks = call.tasks(call.engine)  # a bad request fails here, whatever the route
        decision = await self.choose(call)
        if decision.route == DEFERRED:
            return await self.policy.answer(self, server, call, tasks[0], decision)
        if decision.route == "large":
            answered = await self.escalate(server, call, decision)
            if not isinstance(answered, str):
                return answered
            decision = Decision("local-fallback", answered, privacy=decision.privacy)
        job = server.submit(call.engine, tasks, call.adapter, endpoint=call.endpoint, model=call.model,
                            decision=decision, started=call.started, model_large=self.large_name)
        return await call.respond(job, call.model, headers(decision))

    async def _answer_by_engine(self, server, call: Call):
        """The small model is an external engine (external.py): route, then relay to it."""
        decision = await self.choose(call)
        if decision.route == "large":
            answered = await self.escalate(server, call, decision)
            if not isinstance(answered, str):
                return answered
            decision = Decision("local-fallback", answered, privacy=decision.privacy)
        return await call.engine.answer(server, call, decision)

    async def escalate(self, server, call: Call, decision: Decision):
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
