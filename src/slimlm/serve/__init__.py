"""`slimlm serve`: small local models behind an OpenAI-compatible HTTP API.

    from slimlm.serve import Engine, ServeConfig, create_app
    app = create_app(Engine.open("smollm2-135m-instruct"), ServeConfig(port=8000))
    # uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from slimlm.serve.api import create_app
from slimlm.serve.config import ServeConfig
from slimlm.serve.engine import Engine

__all__ = ["Engine", "ServeConfig", "create_app"]
