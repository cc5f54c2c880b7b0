"""The OpenAI-compatible HTTP API of `slimlm serve`: chat completions, completions, models,
health and metrics, over the engines of engine.py.

Any OpenAI client works against it (set base_url), and so does lm-evaluation-harness's
`local-completions` model, which scores multiple-choice tasks through `echo` + `logprobs`.
Every error has OpenAI's shape and a 4xx that names the problem, and none of them stops the
server. A request is routed before it runs (hybrid.py): the small local model, or a larger one
(a second local engine, or an OpenAI-compatible URL behind the privacy guard), by the configured
policy or a `Router` hook. Each finished request becomes one record (see `Server.record`)
handed to `config.on_record`, where a ledger plugs in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, runtime_checkable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from slimlm.errors import SlimlmError
from slimlm.models.backends.base import GenerationParams
from slimlm.serve import schemas as S
from slimlm.serve.config import ServeConfig
from slimlm.serve.engine import Engine, Job, QueueFull, Task
from slimlm.serve.guard import Guard
from slimlm.serve.metrics import Metrics
from slimlm.serve.types import APIError, Decision

__all__ = ["APIError", "Decision", "Router", "Server", "Upstream", "create_app"]


class Upstream(Protocol):
    """A larger model behind an OpenAI-style chat API."""

    async def chat(self, body: dict) -> dict: ...

    def stream(self, body: dict) -> AsyncIterator[dict]: ...  # chat.completion.chunk dicts


@runtime_checkable
class Router(Protocol):
    """Decides per chat request where it runs, from the prompt's text (message contents joined
    by newlines) and the request body. `decide` may be sync or async, and may take the text
    alone. A router that can say "large" also has an `upstream` attribute (an Upstream)."""

    def decide(self, prompt_text: str, body: dict) -> Decision | Awaitable[Decision]: ...


def _error_of(exc: BaseException, config: ServeConfig) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), code="queue_full", type_="rate_limit_error",
                        headers={"Retry-After": str(config.retry_after_s)})
    if isinstance(exc, SlimlmError):
        return APIError(400, str(exc))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return APIError(500, f"internal error: {type(exc).__name__}: {first}", type_="server_error")


class Server:
    """The state and the shared steps of every request: model lookup, limits, queueing,
    records. The completion routes (routes.py) are written against it."""

    def __init__(self, engines: dict[str, Engine], config: ServeConfig, router: Router | None,
                 large=None) -> None:
        from slimlm.serve.hybrid import Hybrid

        self.engines, self.config, self.router = engines, config, router
        self.hybrid = Hybrid.build(config, router, large)
        self.metrics = Metrics()
        for engine in [*engines.values(), *([large] if isinstance(large, Engine) else [])]:
            self.metrics.watch_queue(engine.name, lambda e=engine: e.queue_depth)
            if getattr(engine, "batcher", None) is not None:
                self.metrics.watch_batcher(engine.name, engine.batcher)

    def error(self, exc: BaseException) -> APIError:
        return _error_of(exc, self.config)

    def resolve(self, name: str) -> tuple[Engine, str | None]:
        """(engine, adapter) for a model name: NAME, or NAME:ADAPTER."""
        for engine in self.engines.values():
            if name == engine.name:
                return engine, None
            if name.startswith(engine.name + ":") and name[len(engine.name) + 1:] in engine.adapters.names:
                return engine, name[len(engine.name) + 1:]
        served = ", ".join(n for e in self.engines.values() for n in e.model_names)
        raise APIError(404, f"the model '{name}' does not exist: this server serves {served}", "model",
                       "model_not_found")

    def max_tokens(self, requested: int | None, default: int, minimum: int = 0) -> int:
        cap = self.config.max_tokens_cap
        if requested is None:
            return min(default, cap)
        if requested > cap:
            raise APIError(400, f"max_tokens is {requested}; this server allows at most {cap}", "max_tokens",
                           "max_tokens_too_large")
        if requested < minimum:
            raise APIError(400, f"max_tokens must be at least {minimum}", "max_tokens", "invalid_value")
        return requested

    def check_prompt(self, engine: Engine, ids: list[int], generating: bool, param: str) -> None:
        limit = min(self.config.max_prompt_tokens or engine.context, engine.context)
        if generating:  # at least one token of room to generate into
            limit = min(limit, engine.context - 1)
        if not ids:
            raise APIError(400, "the prompt is empty: give some text", param, "empty_prompt")
        if len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens; {engine.name} accepts at most {limit} "
                           "here: shorten it", param, "context_length_exceeded")
        if engine.vocab_size and any(not 0 <= t < engine.vocab_size for t in ids):
            raise APIError(400, f"token ids must be between 0 and {engine.vocab_size - 1}", param, "invalid_token")

    def params(self, body, max_tokens: int) -> GenerationParams:
        if body.n not in (None, 1):
            raise APIError(400, f"n is {body.n}: slimlm serve returns one choice per request (n=1)", "n")
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
        return GenerationParams(max_tokens=max_tokens, temperature=temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=body.stops())

    def queue(self, engine: Engine, tasks: list[Task], adapter: str | None) -> Job:
        """Queue the tasks (a 429 APIError if the queue is full)."""
        try:
            return engine.submit(tasks, adapter)
        except QueueFull as exc:
            raise self.error(exc) from None

    def submit(self, engine: Engine, tasks: list[Task], adapter: str | None, *, endpoint: str, model: str,
               decision: Decision, started: float, model_large: str | None = None) -> Job:
        """Queue the tasks; the job records itself when it ends."""
        job = self.queue(engine, tasks, adapter)
        job.on_done.append(lambda j: self.record(endpoint=endpoint, model=model, decision=decision,
                                                 started=started, job=j, model_large=model_large))
        return job

    def record(self, *, endpoint: str, model: str, decision: Decision, started: float, job=None,
               tokens: tuple[int, int] = (0, 0), status: str = "ok", model_large: str | None = None,
               first_token_at: float | None = None) -> None:
        """One dict per finished request, given to config.on_record. Keys: those of the ledger's
        columns (time, route, reason, model_local, model_large, tokens_in, tokens_out, latency_s,
        ttft_s, privacy) plus endpoint, model (as the client named it) and status (ok, cancelled,
        error). `job` is an engine Job or anything with the same counters (cascade.Continued)."""
        route = decision.route
        end = job.finished_at if job is not None and job.finished_at else time.perf_counter()
        first = job.first_token_at if job is not None and job.first_token_at else first_token_at
        rec = {"time": time.time(), "endpoint": endpoint, "model": model, "route": route, "reason": decision.reason,
               "model_local": None if route == "large" else model, "model_large": model_large,
               "tokens_in": job.prompt_tokens if job else tokens[0],
               "tokens_out": job.completion_tokens if job else tokens[1],
               "latency_s": end - started, "ttft_s": (first - started) if first else None,
               "status": job.status if job else status, "privacy": decision.privacy}
        self.metrics.observe(rec)
        if route == "large":
            self.metrics.escalations.labels(reason=decision.label or decision.reason).inc()
        if self.config.on_record is not None:
            try:
                self.config.on_record(rec)
            except Exception:  # noqa: BLE001 - a failing ledger must not fail the request
                logging.getLogger("slimlm.serve").exception("on_record failed")

    @staticmethod
    async def collect(job: Job, request: Request):
        """Wait for a job's results, cancelling it if the client hangs up meanwhile."""

        async def watch():
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            job.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return await job.results()
        finally:
            watcher.cancel()

    def stream(self, frames: AsyncIterator[str], job=None, headers: dict | None = None) -> StreamingResponse:
        """An SSE response. An error after the headers went out is sent as an error event;
        leaving early (the client disconnected) cancels the job."""

        async def guarded():
            try:
                async for frame in frames:
                    yield frame
            except Exception as exc:  # noqa: BLE001
                err = self.error(exc)
                yield S.sse(S.error_body(err.message, err.type, err.param, err.code))
            finally:
                if job is not None:
                    job.cancel()

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})


def create_app(engines: Engine | list[Engine] | dict[str, Engine], config: ServeConfig | None = None,
               router_hook: Router | None = None, large=None) -> FastAPI:
    """A FastAPI app serving `engines` (one per model) under `config`. `large` is the larger model
    requests may be routed to: an Engine (in-process) or a hybrid.Remote (an OpenAI-compatible
    URL); config.policy decides, or `router_hook`, which then decides chat requests and sends
    them to its own `upstream` (default: everything local)."""
    from slimlm.serve import routes

    config = config or ServeConfig()
    if isinstance(engines, Engine) or getattr(engines, "external", False):
        engines = [engines]
    if any(getattr(e, "external", False) for e in (engines.values() if isinstance(engines, dict) else engines)):
        from slimlm.serve.external import check_policy

        check_policy(config.policy)
    server = Server({e.name: e for e in (engines.values() if isinstance(engines, dict) else engines)}, config,
                    router_hook, large)
    # strict_content_type off: `curl -d` sends JSON as form-encoded, and the body is JSON either way.
    app = FastAPI(title="slimlm serve", summary="OpenAI-compatible API for small local models",
                  strict_content_type=False)
    app.state.server = server
    app.add_middleware(Guard, config=config, metrics=server.metrics)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        err = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if err["type"] == "json_invalid":
            return APIError(400, "the request body is not valid JSON: send a JSON object").response()
        loc = [str(x) for x in err["loc"]]
        loc = loc[1:] if loc[:1] == ["body"] else loc
        if not loc:
            return APIError(400, f"the request body must be a JSON object ({err['msg']})").response()
        return APIError(400, f"{'.'.join(loc)}: {err['msg']}", param=loc[0], code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(APIError)
    @app.exception_handler(SlimlmError)
    async def _expected(request: Request, exc: Exception):
        return server.error(exc).response()

    @app.exception_handler(Exception)  # a bug: answered as a 500, logged with its traceback by the server
    async def _any(request: Request, exc: Exception):
        return server.error(exc).response()

    routes.add_routes(app, server)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "slimlm"}
                                           for e in server.engines.values() for n in e.model_names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        server.resolve(model)
        return {"id": model, "object": "model", "created": 0, "owned_by": "slimlm"}

    @app.get("/health")
    async def health():
        models, down = {}, []
        for e in server.engines.values():
            models[e.name] = {"backend": e.backend.label, "context": e.context, "queue_depth": e.queue_depth,
                              "queue_size": e.queue_size, "parallel": e.parallel}
            if getattr(e, "external", False):
                models[e.name]["reachable"] = await e.reachable()
                if not models[e.name]["reachable"]:
                    down.append(e.url)
        body = {"status": "engine unreachable" if down else "ok", "models": models}
        return JSONResponse(body, status_code=503 if down else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
