"""An external engine as the small model: `slimlm serve --engine URL`.

When one machine is not enough, the model should run on an engine built for that (vLLM with
tensor parallelism across GPUs and nodes, llama-server, TGI, Ollama), and slimlm should not
become a home-made cluster. With `--engine URL` slimlm loads no model: its API, routing to a
large model, privacy guard, ledger, metrics and bounded queue stand in front of the engine, and
each request that stays "local" is relayed to the engine as is (same body, streamed chunk by
chunk) by the client the large model already uses (upstream.py: retries with backoff, a key
that never shows).

- The engine's model name comes from its /v1/models (or --engine-name).
- A request the engine cannot answer (unreachable, 5xx after retries) is a 503 naming the URL;
  /health says 503 while the engine does not answer.
- `--engine-remote` marks an engine on someone else's machine: the privacy guard then checks
  every request bound for it, as it checks those bound for --large (redact sends placeholders;
  local refuses the request, since there is no model on this machine to keep it on).
- At most `queue_size` requests are in flight to the engine; beyond that a 429, as locally.
- Routing: fixed and learned policies work; the cascade needs the small model's own
  log-probabilities as it writes, so it is refused with an engine at start-up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from types import SimpleNamespace

from slimlm.errors import SlimlmError
from slimlm.serve.types import APIError


class _NoAdapters:
    names: list[str] = []


class ExternalEngine:
    """What the server asks of an engine, answered by an OpenAI-compatible URL."""

    external = True
    batcher = None
    parallel = None
    context = None
    vocab_size = None
    supports_logprobs = True  # forwarded; the engine answers or refuses
    adapters = _NoAdapters()

    def __init__(self, url: str, name: str, remote, *, queue_size: int = 16, guard=None) -> None:
        self.url, self.name, self.remote, self.queue_size, self.guard = url, name, remote, queue_size, guard
        self.backend = SimpleNamespace(label=f"engine at {url}")
        self.inflight = 0
        self._health: tuple[float, bool] = (0.0, True)

    @classmethod
    def open(cls, url: str, *, name: str | None = None, api_key_env: str | None = None, timeout_s: float = 60.0,
             queue_size: int = 16, remote: bool = False, privacy: str = "local") -> ExternalEngine:
        from slimlm.data.privacy import PrivacyGuard
        from slimlm.serve.large import Remote
        from slimlm.serve.upstream import the_one_model, without_userinfo

        name = name or the_one_model(url, api_key_env, timeout_s=min(timeout_s, 10.0))
        guard = PrivacyGuard(privacy) if remote and privacy != "off" else None
        return cls(without_userinfo(url), name, Remote.open(url, api_key_env, timeout_s=timeout_s),
                   queue_size=queue_size, guard=guard)

    @property
    def model_names(self) -> list[str]:
        return [self.name]

    @property
    def queue_depth(self) -> int:
        return self.inflight

    async def reachable(self, ttl_s: float = 5.0) -> bool:
        """Whether the engine answers GET /models (asked at most every ttl_s seconds)."""
        checked, ok = self._health
        if time.monotonic() - checked < ttl_s:
            return ok
        ok = await self.remote.chat.answers("/models")
        self._health = (time.monotonic(), ok)
        return ok

    async def guarded(self, call, decision):
        """The privacy guard's verdict for a request bound for a remote engine."""
        if self.guard is None:
            return decision
        found = await asyncio.to_thread(self.guard.check, call.text)
        if not found.kinds:
            return replace(decision, privacy=f"{self.guard.mode}: nothing found")
        if not found.allowed_to_leave:
            raise APIError(403, f"this request holds {', '.join(found.kinds)} and the engine is remote: --privacy "
                           f"{self.guard.mode} keeps such requests off other machines, and this server has no model "
                           "of its own; use --privacy redact, or serve a local model", "messages", "privacy_refused")
        return replace(decision, privacy=f"{self.guard.mode}: {', '.join(found.kinds)}", redact=True)

    async def answer(self, server, call, decision):
        """Relay the call to the engine: the response, or an APIError (429 when full, 503 when
        the engine does not answer)."""
        from fastapi.responses import StreamingResponse

        from slimlm.serve.large import ask_remote

        if self.inflight >= self.queue_size:
            raise APIError(429, f"{self.name} has {self.queue_size} requests in flight: retry in a moment",
                           code="queue_full", type_="rate_limit_error",
                           headers={"Retry-After": str(server.config.retry_after_s)})
        decision = await self.guarded(call, decision)
        self.inflight += 1
        streaming = False
        try:
            answered = await ask_remote(server, call, decision, self.remote, self.guard, self.name, large=False)
            if isinstance(answered, str):
                self._health = (time.monotonic(), False)
                raise APIError(503, f"the engine at {self.url} did not answer ({answered.split('; ')[-1]}): check "
                               "that it runs", code="engine_unavailable", type_="server_error")
            if isinstance(answered, StreamingResponse):
                answered.body_iterator = self._release_after(answered.body_iterator)
                streaming = True
            return answered
        finally:
            if not streaming:
                self.inflight -= 1

    async def _release_after(self, frames):
        try:
            async for frame in frames:
                yield frame
        finally:
            self.inflight -= 1

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.remote.aclose()


def check_policy(policy: str) -> None:
    """Refuse, at start-up, a routing policy an external engine cannot serve."""
    if policy == "cascade":
        raise SlimlmError("--policy cascade reads the small model's own log-probabilities as it writes, which an "
                          "--engine does not give: use --policy local, large or learned with --engine")
