"""What the modules of the server hand each other: an error in OpenAI's shape (`APIError`) and
where a request runs (`Decision`, defined with the routing policies in slimlm.routing).

They live here, below api.py, hybrid.py, routes.py and serve/policies.py, so that those modules
import downward only: before, api.py held both and hybrid.py and routes.py imported it back, an
import cycle. Nothing here imports the rest of the server.
"""

from __future__ import annotations

# The one Decision: the routing policies (slimlm.routing, below serve/) return it, and the server
# adds the privacy guard's verdict and the escalation label to it.
from slimlm.routing.policies import Decision

__all__ = ["APIError", "Decision"]


class APIError(Exception):
    """An error answered in OpenAI's shape with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers or {}

    def response(self):
        """The error as a FastAPI JSONResponse."""
        from fastapi.responses import JSONResponse

        from slimlm.serve.schemas import error_body

        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)
