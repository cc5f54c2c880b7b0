"""`slimlm serve`: small local models behind an OpenAI-compatible HTTP API.

    from slimlm.serve import Engine, ServeConfig, create_app
    app = create_app(Engine.open("smollm2-135m-instruct"), ServeConfig(port=8000))
    # uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import importlib

# The routing policies register themselves on import (policies.py holds the built-in ones; a
# policy in a module of its own is one more import line here).
from slimlm.serve import policies  # noqa: F401

__all__ = ["Engine", "ServeConfig", "create_app"]
_LAZY = {"create_app": "slimlm.serve.api", "ServeConfig": "slimlm.serve.config", "Engine": "slimlm.serve.engine"}


def __getattr__(name: str):
    """The server's classes load when first used, not when the CLI starts and reads the
    policies for its --help (FastAPI and the engine take most of a second to import)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimlm.serve' has no attribute {name!r}")
