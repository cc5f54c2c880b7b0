"""The client `slimlm serve` uses to reach the large model: any OpenAI-compatible endpoint.

Hosted APIs fail in ordinary ways (a refused connection, a 502 from a proxy, a 429 when a
rate limit is hit), and most of those go away within a second, so every call is retried with
exponential backoff before the server gives up and falls back to the local model. Errors the
request itself caused (400, 401, 404) are not retried: they would fail the same way again.

The API key is read from an environment variable the user names, never passed as an argument
(arguments end up in shell history, process lists and config files), and it appears in no log
line, repr or exception message: error texts are scrubbed of it in case an upstream echoes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import AsyncIterator

from slimlm.errors import SlimlmError

log = logging.getLogger(__name__)
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 30.0


class UpstreamError(SlimlmError):
    """The upstream answered with an error that retrying will not fix (e.g. 400, 401)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached, or kept failing, after the last try."""


class Upstream:
    """An async OpenAI-compatible client: `await chat(body)`, `async for chunk in stream(body)`.

    `base_url` is the API root, e.g. https://api.openai.com/v1 (chat goes to
    {base_url}/chat/completions). `retries` is the number of tries after the first; the wait
    before try n+1 is backoff_s * 2**n, or the server's Retry-After when it asks for longer.
    """

    def __init__(self, base_url: str, api_key_env: str | None = None, timeout_s: float = 30.0,
                 retries: int = 2, backoff_s: float = 0.5, transport=None) -> None:
        import httpx

        if not re.match(r"^https?://", base_url or ""):
            raise SlimlmError(f"upstream URL {without_userinfo(base_url)!r} must start with http:// or https://")
        if retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise SlimlmError("upstream retries and backoff must be >= 0 and the timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.api_key_env = api_key_env
        self._key, headers = api_key(api_key_env, self.base_url)
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, transport=transport,
                                         timeout=httpx.Timeout(timeout_s))

    def __repr__(self) -> str:  # never the key
        return f"Upstream({without_userinfo(self.base_url)!r}, api_key_env={self.api_key_env!r})"

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def answers(self, path: str = "/models", timeout_s: float = 2.0) -> bool:
        """Whether GET {base_url}{path} answers 200 now (one try: a health check, not a call)."""
        try:
            return (await self._client.get(path, timeout=timeout_s)).status_code == 200
        except Exception:  # noqa: BLE001 - any failure means "not answering"
            return False

    # -- calls -------------------------------------------------------------------------------
    async def chat(self, body: dict) -> dict:
        """POST /chat/completions without streaming; the parsed JSON answer."""
        body = {**body, "stream": False}
        for attempt in range(self.retries + 1):
            try:
                response = await self._client.post("/chat/completions", json=body)
            except _transport_errors() as exc:
                await self._failed(attempt, _describe(exc))
                continue
            if response.status_code in RETRY_STATUS:
                await self._failed(attempt, f"HTTP {response.status_code}", response.headers.get("retry-after"))
                continue
            self._raise_for_client_error(response.status_code, response.text)
            try:
                return response.json()
            except ValueError:
                raise UpstreamError(f"{self._where()} answered HTTP {response.status_code} with a body that is "
                                    "not JSON: check that the URL is an OpenAI-compatible API root") from None
        raise AssertionError("unreachable")  # _failed raises after the last try

    async def stream(self, body: dict) -> AsyncIterator[dict]:
        """POST /chat/completions with stream=true; yields each server-sent event's JSON chunk.

        Failures before the first chunk are retried like `chat`; once a chunk has been handed
        on, a broken stream cannot be replayed, so it raises UpstreamUnavailable at once.
        """
        body = {**body, "stream": True}
        for attempt in range(self.retries + 1):
            sent, failure = 0, None
            try:
                async with self._client.stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code in RETRY_STATUS:  # retried below, once the connection is released
                        failure = (f"HTTP {response.status_code}", response.headers.get("retry-after"))
                    else:
                        if response.status_code >= 400:
                            await response.aread()
                            self._raise_for_client_error(response.status_code, response.text)
                        state = {"done": False, "finished": False}
                        async for chunk in _sse_events(response.aiter_lines(), state):
                            sent += 1
                            yield chunk
                        if state["done"] or state["finished"]:
                            return
                        raise UpstreamUnavailable(f"{self._where()} ended the stream after {sent} chunks without "
                                                  "finishing it (no [DONE], no finish_reason)")
            except _transport_errors() as exc:
                if sent:
                    raise UpstreamUnavailable(self._scrub(f"{self._where()} broke off the stream after {sent} "
                                                          f"chunks ({_describe(exc)})")) from None
                failure = (_describe(exc), None)
            await self._failed(attempt, *failure)

    # -- helpers -----------------------------------------------------------------------------
    async def _failed(self, attempt: int, what: str, retry_after: str | None = None) -> None:
        """Wait before the next try, or raise UpstreamUnavailable after the last one."""
        tries = attempt + 1
        if attempt >= self.retries:
            raise UpstreamUnavailable(self._scrub(f"{self._where()} unavailable after {tries} "
                                                  f"{'try' if tries == 1 else 'tries'} (last: {what}): check "
                                                  "that it is up, or route to the local model"))
        delay = self.backoff_s * 2 ** attempt
        try:
            delay = max(delay, min(float(retry_after), MAX_RETRY_AFTER_S)) if retry_after else delay
        except ValueError:  # Retry-After as an HTTP date: keep our own backoff
            pass
        log.info("upstream %s: %s, try %d of %d, retrying in %.2fs", without_userinfo(self.base_url), what,
                 tries, self.retries + 1, delay)
        await asyncio.sleep(delay)

    def _raise_for_client_error(self, status: int, text: str) -> None:
        if status < 400:
            return
        detail = " ".join((text or "").split())[:200]
        hint = {401: "check the API key variable", 403: "check the API key's permissions",
                404: "check the URL (it should end at the API root, e.g. /v1) and the model name"}.get(status, "")
        raise UpstreamError(self._scrub(f"{self._where()} refused the request with HTTP {status}"
                                        f"{': ' + detail if detail else ''}{'; ' + hint if hint else ''}"), status)

    def _where(self) -> str:
        return f"upstream {without_userinfo(self.base_url)}"

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


async def _sse_events(lines, state: dict) -> AsyncIterator[dict]:
    """JSON objects of a server-sent event stream, up to `data: [DONE]` (state["done"]); marks
    state["finished"] when a chunk carries a finish_reason. Multi-line data fields are joined;
    comments (':'), event names and ids are ignored."""
    data: list[str] = []
    async for line in _with_end(lines):
        if line is not None and line != "":
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            continue
        if data:  # a blank line (or the end) closes an event
            payload, data = "\n".join(data), []
            if payload.strip() == "[DONE]":
                state["done"] = True
                return
            chunk = _json_event(payload)
            if any(isinstance(c, dict) and c.get("finish_reason") for c in chunk.get("choices") or []):
                state["finished"] = True
            yield chunk


async def _with_end(lines):
    async for line in lines:
        yield line
    yield None


def _json_event(payload: str) -> dict:
    try:
        return json.loads(payload)
    except ValueError:
        raise UpstreamError("the upstream sent a stream event that is not JSON: check that it is an "
                            "OpenAI-compatible API") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    import httpx

    return (httpx.TransportError,)  # connect/read/write errors and timeouts, protocol errors


def _describe(exc: BaseException) -> str:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused or unreachable"
    return type(exc).__name__


def without_userinfo(url: str | None) -> str:
    return re.sub(r"://[^/@]*@", "://", url or "")


def api_key(api_key_env: str | None, base_url: str) -> tuple[str | None, dict]:
    """(the key from $api_key_env, the Authorization header carrying it); a named variable that
    is not set is an error."""
    if not api_key_env:
        return None, {}
    key = os.environ.get(api_key_env)
    if not key:
        raise SlimlmError(f"the environment variable {api_key_env} is not set: export it with the API key "
                          f"for {without_userinfo(base_url.rstrip('/'))}")
    return key, {"Authorization": f"Bearer {key}"}


def served_models(base_url: str, api_key_env: str | None = None, timeout_s: float = 10.0) -> list[str]:
    """The model ids an OpenAI-compatible API lists at GET {base_url}/models (at start-up, so
    `--large URL` can name the model the upstream serves instead of forwarding the client's)."""
    import httpx

    where = without_userinfo(base_url)
    _, headers = api_key(api_key_env, base_url)
    try:
        response = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=timeout_s)
    except httpx.TransportError as exc:
        raise UpstreamUnavailable(f"could not ask {where} for its models ({_describe(exc)}): start it, fix the "
                                  "URL, or name the model with --large-name") from None
    if response.status_code != 200:
        raise UpstreamError(f"{where}/models answered HTTP {response.status_code}: name the model with --large-name",
                            response.status_code)
    try:
        data = response.json()["data"]
        return [m["id"] for m in data]
    except (ValueError, KeyError, TypeError):
        raise UpstreamError(f"{where}/models did not answer OpenAI's model list: is it an OpenAI-compatible API "
                            "root (ending in /v1)?") from None


def the_one_model(base_url: str, api_key_env: str | None = None, timeout_s: float = 10.0) -> str:
    """The upstream's model when it serves exactly one; else a SlimlmError listing them."""
    models = served_models(base_url, api_key_env, timeout_s)
    if len(models) != 1:
        listed = ", ".join(models[:10]) + (" ..." if len(models) > 10 else "") if models else "none"
        raise SlimlmError(f"{without_userinfo(base_url)} serves {len(models)} models ({listed}): choose one with "
                          "--large-name")
    return models[0]
