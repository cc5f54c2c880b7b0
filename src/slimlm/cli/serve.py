"""`slimlm serve`: parsing and printing only; the server is slimlm.serve."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from slimlm.cli.app import BackendOpt, ModelArg, app, err
from slimlm.cli.choices import live_help_option
from slimlm.errors import SlimlmError
from slimlm.serve.policies import POLICIES, sends_to_large


def _policy_help() -> str:
    """--policy's help, from the registry of routing policies (slimlm/serve/policies.py) as it is when the CLI runs."""
    return ("How requests are routed: " + "; ".join(f"{name}: {text}" for name, text in POLICIES.items())
            + ' (default: cascade with --large, else local). A request may override it with '
              '"slimlm": {"route": "local"|"large"|"auto"}.')


@app.command()
def serve(
    model: Optional[str] = typer.Argument(None, help="Model folder, .gguf file, or built-in name "
                                          "(smollm2-135m-instruct, gemma3-270m); or leave it out and give --engine."),
    backend: str = BackendOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback needs "
                             "--api-key-env."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on."),
    max_tokens_cap: int = typer.Option(2048, "--max-tokens-cap", help="Most tokens one request may ask for "
                                       "(more is a 400)."),
    queue_size: int = typer.Option(16, "--queue-size", help="Requests that may wait for the model; more get a "
                                   "429 with Retry-After."),
    parallel: Optional[int] = typer.Option(None, "--parallel", "-np", help="Sequences decoded together "
                                           "(continuous batching: a request joins the running batch at the next "
                                           "step). Default: 16 on llama.cpp (measured, see bench/RESULTS.md), 1 on "
                                           "torch. Each slot holds its own --n-ctx of KV cache."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Most tokens one batched step reads "
                                               "(decoding tokens first, then prompt chunks). Default: 512."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help="Reuse the cached KV of a "
                                      "prompt prefix (a system prompt, few-shot examples) that a finished request "
                                      "left in a slot."),
    cache_ram: Optional[int] = typer.Option(None, "--cache-ram", metavar="MIB", help="Host memory for the KV "
                                            "caches of prompts whose slot was taken by another request; a prompt "
                                            "that comes back (a returning chat, a shared system prompt) is "
                                            "restored instead of read again (llama.cpp). Default: 1024; 0: off."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", metavar="NAME",
                                              help="Require 'Authorization: Bearer KEY' with one of the keys in "
                                                   "the environment variable NAME (comma separated)."),
    adapter: list[str] = typer.Option([], "--adapter", metavar="NAME=PATH",
                                      help="Serve a PEFT LoRA folder as MODEL:NAME (torch backend; repeatable)."),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="Context length (llama.cpp: allocated at start; "
                                        "torch: a cap on the model's own)."),
    engine_url: Optional[str] = typer.Option(None, "--engine", metavar="URL", rich_help_panel="External engine",
                                             help="Serve an OpenAI-compatible engine (vLLM, llama-server, TGI, "
                                                  "Ollama; http(s)://.../v1) instead of a model in this process: "
                                                  "slimlm's API, routing, privacy guard, ledger and metrics in "
                                                  "front of it."),
    engine_name: Optional[str] = typer.Option(None, "--engine-name", rich_help_panel="External engine",
                                              help="The engine's model (default: the one its /v1/models lists)."),
    engine_api_key_env: Optional[str] = typer.Option(None, "--engine-api-key-env", metavar="NAME",
                                                     rich_help_panel="External engine",
                                                     help="Environment variable holding the engine's API key."),
    engine_remote: bool = typer.Option(False, "--engine-remote", rich_help_panel="External engine",
                                       help="The engine runs on another machine: the privacy guard (--privacy) "
                                            "checks every request sent to it."),
    large: Optional[str] = typer.Option(None, "--large", metavar="MODEL_OR_URL", rich_help_panel="Routing",
                                        help="The larger model hard requests go to: an OpenAI-compatible API root "
                                             "(http(s)://.../v1) or a model on this machine (loaded in-process)."),
    large_api_key_env: Optional[str] = typer.Option(None, "--large-api-key-env", metavar="NAME",
                                                    rich_help_panel="Routing",
                                                    help="Environment variable holding the --large URL's API key "
                                                         "(sent as Authorization: Bearer; never logged)."),
    large_name: Optional[str] = typer.Option(None, "--large-name", rich_help_panel="Routing",
                                             help="Model name to ask a --large URL for (default: the one model "
                                                  "its /v1/models lists; with several, this is required)."),
    large_timeout: float = typer.Option(30.0, "--large-timeout", rich_help_panel="Routing",
                                        help="Seconds to wait for a --large URL per try (2 retries with backoff)."),
    policy: Optional[str] = live_help_option(_policy_help, None, "--policy", rich_help_panel="Routing"),
    router: Optional[str] = typer.Option(None, "--router", metavar="PATH", rich_help_panel="Routing",
                                         help="The learned router (`slimlm router train`) for --policy learned."),
    cascade_threshold: Optional[float] = typer.Option(None, "--cascade-threshold", rich_help_panel="Routing",
                                                      help="Escalate when the small model's confidence is below "
                                                           "this (default: mean -1.0, min -4.0, entropy -1.5)."),
    cascade_metric: str = typer.Option("mean", "--cascade-metric", rich_help_panel="Routing",
                                       help="Confidence from the first tokens' log-probs: mean | min | entropy."),
    cascade_tokens: int = typer.Option(16, "--cascade-tokens", rich_help_panel="Routing",
                                       help="Tokens the small model writes (held back) before the cascade decides."),
    privacy: str = typer.Option("local", "--privacy", rich_help_panel="Routing",
                                help="Requests with personal data or secrets, for a --large URL: local (keep them "
                                     "here) | redact (send placeholders, restore the answer) | off."),
    ledger: Optional[str] = typer.Option(None, "--ledger", metavar="URL_OR_PATH", rich_help_panel="Ledger",
                                         help="Record every request here (SQLite path or SQLAlchemy URL; default: "
                                              "ledger.db under your data folder). See `slimlm ledger`."),
    no_ledger: bool = typer.Option(False, "--no-ledger", rich_help_panel="Ledger", help="Record nothing."),
    large_price_model: Optional[str] = typer.Option(None, "--large-price-model", metavar="NAME",
                                                    rich_help_panel="Ledger",
                                                    help="Price every request at this API model's list price "
                                                         "(a name in slimlm's price table, e.g. gpt-4o-mini)."),
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
    \b
    Hybrid routing: hard requests go to a larger model, private ones never leave:
      export BIG_KEY=...
      slimlm serve smollm2-135m-instruct --large https://api.openai.com/v1 --large-name gpt-4o-mini \\
          --large-api-key-env BIG_KEY --policy cascade --privacy redact --large-price-model gpt-4o-mini
    Per request: client.chat.completions.create(..., extra_body={"slimlm": {"route": "local"}}).
    Responses say where they ran in the x-slimlm-route and x-slimlm-reason headers.
    Evaluate through it with lm-evaluation-harness's local-completions model:
      lm_eval --model local-completions --model_args model=NAME,base_url=http://127.0.0.1:8000/v1/completions,...
    """
    import uvicorn

    from slimlm.serve import Engine, ServeConfig, create_app
    from slimlm.serve.config import keys_from_env, parse_adapters
    from slimlm.serve.hybrid import LedgerWriter
    from slimlm.serve.large import is_url, open_large
    from slimlm.serve.ledger import Ledger, safe_url
    from slimlm.serve.upstream import without_userinfo

    if bool(model) == bool(engine_url):
        raise SlimlmError("give a MODEL to serve, or --engine URL to serve an external engine (not both)")
    if (engine_name or engine_api_key_env or engine_remote) and not engine_url:
        raise SlimlmError("--engine-name, --engine-api-key-env and --engine-remote are for --engine URL: give it too")
    if large_api_key_env and not large:
        raise SlimlmError("--large-api-key-env is the key for --large URL: give --large too, or leave it out")
    if sends_to_large(policy) and not large:
        raise SlimlmError(f"--policy {policy} sends requests to a large model: name one with --large MODEL_OR_URL")
    config = ServeConfig(host=host, port=port, max_tokens_cap=max_tokens_cap, queue_size=queue_size,
                         parallel=parallel, batch_tokens=batch_tokens, prefix_cache=prefix_cache,
                         cache_ram_mib=cache_ram,
                         api_keys=keys_from_env(api_key_env) if api_key_env else [],
                         adapters=parse_adapters(adapter), n_ctx=n_ctx,
                         policy=policy or ("cascade" if large else "local"), router_path=router,
                         cascade_threshold=cascade_threshold, cascade_metric=cascade_metric,
                         cascade_first_n=cascade_tokens, privacy=privacy, large_name=large_name)
    if large and is_url(large) and not large_name:  # ask it which model it serves, once, now
        from slimlm.serve.upstream import the_one_model

        config.large_name = the_one_model(large, large_api_key_env, timeout_s=large_timeout)
    writer = None if no_ledger else LedgerWriter(Ledger(ledger), large_price_model)
    config.on_record = writer
    engine = big = None
    try:
        if engine_url:
            from slimlm.serve.external import ExternalEngine, check_policy

            check_policy(config.policy)
            engine = ExternalEngine.open(engine_url, name=engine_name, api_key_env=engine_api_key_env,
                                         timeout_s=600.0, queue_size=config.queue_size,
                                         remote=engine_remote, privacy=config.privacy)
        else:
            engine = Engine.open(model, backend, queue_size=config.queue_size, n_ctx=config.n_ctx,
                                 adapters=config.adapters, parallel=config.parallel, batch_tokens=config.batch_tokens,
                                 prefix_cache=config.prefix_cache, cache_ram_mib=config.cache_ram_mib)
        if large:
            big = open_large(large, api_key_env=large_api_key_env, timeout_s=large_timeout, n_ctx=n_ctx,
                             queue_size=config.queue_size)
        app = create_app(engine, config, large=big)
        names = ", ".join(engine.model_names)
        auth = f"keys from ${api_key_env}" if config.api_keys else "no API key (loopback only)"
        err.print(f"[dim]serving {names} on {engine.backend.label} at http://{host}:{port}/v1 ({auth}); "
                  "Ctrl-C stops[/dim]")
        if large:
            where = without_userinfo(large) if is_url(large) else f"{big.name} (in-process)"
            guard = f", privacy {config.privacy}" if is_url(large) else ""
            err.print(f"[dim]routing: policy {config.policy}, large model {where}{guard}[/dim]")
        err.print(f"[dim]ledger: {safe_url(writer.ledger.url) if writer else 'off (--no-ledger)'}[/dim]")
        uvicorn.run(app, host=host, port=port, log_level=os.environ.get("SLIMLM_LOG", "info"))
    finally:
        for opened in (big, engine):
            if hasattr(opened, "close"):
                opened.close()
        if writer is not None:
            writer.close()


@app.command()
def batch(
    model: str = ModelArg,
    requests: Path = typer.Argument(..., metavar="IN.jsonl", help="OpenAI batch file: one request per line "
                                    '({"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}).'),
    out: Path = typer.Option(..., "--out", "-o", metavar="OUT.jsonl", help="Answers in OpenAI's batch output "
                             "format, in input order."),
    backend: str = BackendOpt,
    parallel: Optional[int] = typer.Option(None, "--parallel", "-np", help="Sequences decoded together (default: "
                                           "as `slimlm serve`)."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Most tokens one step reads."),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="Context per sequence."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip malformed lines (each reported) "
                                        "instead of stopping before any work."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Answer a file of requests with the serving engine (continuous batching), resumably.

    \b
    Each line goes through the same routes as `slimlm serve` (chat templates, stop strings,
    logprobs), in-process. Answers are saved as they come; a killed run continues where it
    stopped when rerun with the same arguments, and OUT appears, whole, at the end.
    \b
    Example:
      slimlm batch smollm2-135m-instruct tickets.jsonl --out answers.jsonl
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from slimlm.serve import Engine
    from slimlm.serve.batch_job import read_requests, run_batch

    if out.exists() and not force:
        raise SlimlmError(f"{out} exists: pass --force to replace it, or choose another --out")
    read_requests(requests, skip_bad_lines)  # a bad file fails before the model loads
    engine = Engine.open(model, backend, n_ctx=n_ctx, parallel=parallel, batch_tokens=batch_tokens, queue_size=16)
    bar = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeRemainingColumn(), console=err, transient=True)
    state = {"task": None, "start": time.perf_counter(), "tokens0": 0, "progress": None}

    def started(progress) -> None:
        for line in progress.skipped_lines:
            err.print(f"[yellow]skipped {line}[/yellow]", soft_wrap=True)  # paths stay whole
        state["progress"], state["tokens0"] = progress, progress.completion_tokens
        state["task"] = bar.add_task("batch", total=progress.total, completed=progress.done, rate="")
        if progress.done:
            err.print(f"[dim]resuming: {progress.done} of {progress.total} already answered[/dim]")

    def answered(row) -> None:
        p = state["progress"]
        rate = (p.completion_tokens - state["tokens0"]) / max(time.perf_counter() - state["start"], 1e-9)
        bar.update(state["task"], completed=p.done, rate=f"{rate:.0f} tok/s")

    try:
        with bar:
            result = run_batch(engine, requests, out, skip_bad_lines=skip_bad_lines, force=force, on_start=started,
                               on_answer=answered)
    finally:
        engine.close()
    seconds = time.perf_counter() - state["start"]
    new_tokens = result.completion_tokens - state["tokens0"]
    err.print(f"{result.total} requests answered into {out} ({result.failed} with an error); "
              f"{new_tokens} new completion tokens in {seconds:.1f} s = {new_tokens / max(seconds, 1e-9):.1f} tok/s "
              f"on {engine.backend.label} with {engine.parallel} slots", soft_wrap=True)
