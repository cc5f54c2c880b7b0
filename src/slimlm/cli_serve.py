"""`slimlm serve`: parsing and printing only; the server is slimlm.serve."""

from __future__ import annotations

import os
from typing import Optional

import typer

from slimlm.cli import BackendOpt, ModelArg, app, err


@app.command()
def serve(
    model: str = ModelArg,
    backend: str = BackendOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback needs "
                             "--api-key-env."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on."),
    max_tokens_cap: int = typer.Option(2048, "--max-tokens-cap", help="Most tokens one request may ask for "
                                       "(more is a 400)."),
    queue_size: int = typer.Option(16, "--queue-size", help="Requests that may wait for the model; more get a "
                                   "429 with Retry-After."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", metavar="NAME",
                                              help="Require 'Authorization: Bearer KEY' with one of the keys in "
                                                   "the environment variable NAME (comma separated)."),
    adapter: list[str] = typer.Option([], "--adapter", metavar="NAME=PATH",
                                      help="Serve a PEFT LoRA folder as MODEL:NAME (torch backend; repeatable)."),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="Context length (llama.cpp: allocated at start; "
                                        "torch: a cap on the model's own)."),
):
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, logprobs).

    \b
    Example:
      slimlm serve smollm2-135m-instruct --port 8000
    then, from Python:
      from openai import OpenAI
      client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
      reply = client.chat.completions.create(model="smollm2-135m-instruct",
                                             messages=[{"role": "user", "content": "Name a prime."}])
      print(reply.choices[0].message.content)
    \b
    GET /v1/models lists the model names (MODEL, and MODEL:NAME for each --adapter);
    GET /health and GET /metrics (Prometheus) are for monitoring.
    Evaluate through it with lm-evaluation-harness's local-completions model:
      lm_eval --model local-completions --model_args model=NAME,base_url=http://127.0.0.1:8000/v1/completions,...
    """
    import uvicorn

    from slimlm.serve import Engine, ServeConfig, create_app
    from slimlm.serve.config import keys_from_env, parse_adapters

    config = ServeConfig(host=host, port=port, max_tokens_cap=max_tokens_cap, queue_size=queue_size,
                         api_keys=keys_from_env(api_key_env) if api_key_env else [],
                         adapters=parse_adapters(adapter), n_ctx=n_ctx)
    engine = Engine.open(model, backend, queue_size=config.queue_size, n_ctx=config.n_ctx, adapters=config.adapters)
    names = ", ".join(engine.model_names)
    auth = f"keys from ${api_key_env}" if config.api_keys else "no API key (loopback only)"
    err.print(f"[dim]serving {names} on {engine.backend.name} at http://{host}:{port}/v1 ({auth}); "
              "Ctrl-C stops[/dim]")
    try:
        uvicorn.run(create_app(engine, config), host=host, port=port, log_level=os.environ.get("SLIMLM_LOG", "info"))
    finally:
        engine.close()
