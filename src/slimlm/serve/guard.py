"""What every request passes before it reaches a route: the body limit, the API key, and the
request counter. An ASGI middleware, so a 413 or 401 is answered before FastAPI reads or parses
the body, and every status code (errors included) is counted once.
"""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse

from slimlm.serve.schemas import error_body


async def _reject(scope, receive, send, status: int, message: str, code: str, type_="invalid_request_error"):
    await JSONResponse(error_body(message, type_, None, code), status_code=status)(scope, receive, send)


class Guard:
    def __init__(self, app, config, metrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self.keys = [k.encode() for k in config.api_keys]

    def _authorized(self, headers: dict) -> bool | None:
        """None: no key given; False: a wrong key; True: a right one."""
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        given = key.strip().encode("latin-1")
        return any(hmac.compare_digest(given, k) for k in self.keys)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(path, message["status"])
            await send(message)

        headers = dict(scope["headers"])
        if self.keys and path.startswith("/v1/"):
            ok = self._authorized(headers)
            if not ok:
                message = ("no API key: send the header 'Authorization: Bearer KEY'" if ok is None
                           else "incorrect API key: use one of the keys the server was started with")
                return await _reject(scope, receive, counted_send, 401, message, "invalid_api_key")
        limit = self.config.max_body_bytes
        too_large = (f"the request body is larger than this server's limit of {limit} bytes: "
                     "send a shorter prompt, or fewer prompts per request")
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            return await _reject(scope, receive, counted_send, 400, "invalid Content-Length header", "bad_request")
        if declared > limit:
            return await _reject(scope, receive, counted_send, 413, too_large, "body_too_large")
        if declared < 0 and scope["method"] in ("POST", "PUT", "PATCH"):
            # No length announced (chunked): read up to the limit here, then replay the body.
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > limit:
                    return await _reject(scope, receive, counted_send, 413, too_large, "body_too_large")
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return await receive()

            return await self.app(scope, replay, counted_send)
        return await self.app(scope, receive, counted_send)
