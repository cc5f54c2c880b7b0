#!/usr/bin/env python3
"""Serving under load: `slimlm serve` with continuous batching against `llama-server` and
`python -m llama_cpp.server`, same model file, same prompts, same machine, one run.

All servers are up at once (an idle one costs nothing) and, at each number of concurrent
streaming clients (default 1, 4, 16, 64), take turns for --rounds rounds, the order alternating,
so a slower moment of this shared machine hurts all alike; the rows are the rounds' means. In a
turn the clients ask one chat request after another for --duration seconds (requests in flight
when time is up finish and count): aggregate completion tokens/s (content chunks: each server sends
one per token), requests/s, time to first token and latency p50/p99, failures, and 429s (a
client that gets one waits its Retry-After and asks again; they are counted apart, and are only
allowed above --parallel + --queue-size clients).

The peer, llama-server, is built from the same vendored llama.cpp with the same CMake flags as
slimlm's bindings (bench/llama_tools.py --server) and runs with the same threads, batch and
flash-attention setting, `--parallel N` slots of the same context each and continuous batching
(its default). llama_cpp.server serializes requests (its issues #771, #1329); it is measured at
1 client unless --peer-levels says otherwise. A client still waiting 120 s after its turn ended
counts as failed. (llama-server once stopped answering every stream at 16 clients here: the
bench had piped its stderr and never read it, so its request log filled the pipe and blocked
it. Servers now log to a file: bench/serve.py `start`.)

`--mc N` adds prefix caching: N questions of the built-in pydoc multiple-choice task sent as
lm-evaluation-harness sends them (one /v1/completions request per choice: the question, then the
choice, echo, logprobs, max_tokens 0; one client, in order), through `slimlm serve` with and
without `--no-prefix-cache`: requests/s, and whether the log-probabilities are the same.

`--choose` first measures slimlm alone at 16 clients with --parallel 4, 8 and 16 and
--batch-tokens 256 and 512, to pick the defaults (serve/engine.py DEFAULT_PARALLEL).

    python bench/llama_tools.py --server     # once: builds llama-server (minutes)
    python bench/serve_load.py [--duration 30] [--clients 1,4,16,64] [--choose]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from llama_tools import SERVER, TOOLS, build
from results import append_section
from serve import MODEL, PROMPTS, free_port, start

import slimlm  # noqa: F401  (switches hub access off before transformers is imported)
from slimlm.hardware import cpu_info, default_threads
from slimlm.models.reference import resolve

CTX = 1024  # per slot: prompts here are < 100 tokens and answers --tokens
STUCK_S = 120.0  # seconds after a turn's end before a client still waiting counts as failed


def slimlm_cmd(port: int, tmp: Path, parallel: int, batch_tokens: int, queue: int) -> list[str]:
    return [sys.executable, "-c", "from slimlm.cli import main; main()", "serve", MODEL, "--port", str(port),
            "--n-ctx", str(CTX), "--parallel", str(parallel), "--batch-tokens", str(batch_tokens),
            "--queue-size", str(queue), "--ledger", str(tmp / f"ledger-{port}.db")]


def llama_server_cmd(port: int, path: Path, parallel: int, batch_tokens: int) -> list[str]:
    t = str(default_threads())
    return [str(build((*TOOLS, SERVER)) / SERVER), "-m", str(path), "--port", str(port), "--host", "127.0.0.1",
            "-c", str(CTX * parallel), "-np", str(parallel), "-t", t, "-tb", t, "-b", str(batch_tokens),
            "-ub", "512", "-fa", "off", "--alias", MODEL, "--no-webui"]


def peer_cmd(port: int, path: Path | None = None) -> list[str]:
    path = path or resolve(MODEL).path
    t = str(default_threads())
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", MODEL, "--port", str(port),
            "--n_ctx", str(CTX), "--n_threads", t, "--n_threads_batch", t, "--n_batch", "512", "--n_ubatch", "512",
            "--logits_all", "False", "--verbose", "False"]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load(port: int, clients: int, duration: float, tokens: int, number_from: int = 0) -> dict:
    """`clients` threads streaming chat requests one after another for `duration` seconds. Request
    texts are numbered from `number_from`: a turn that repeated an earlier turn's texts would measure a
    replay (llama-server's RAM prompt cache, and slimlm's, restore a repeated prompt whole)."""
    import json

    ttfts, latencies, chunks, failures, rejected, retried, lock = [], [], [0], [0], [0], [0], threading.Lock()
    stop_at = time.perf_counter() + duration

    def worker(seed: int) -> None:
        i = number_from + seed
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=120) as http:
            while time.perf_counter() < stop_at:
                body = {"model": MODEL, "max_tokens": tokens, "temperature": 0, "stream": True,
                        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" (request {i})"}]}
                i += clients
                t0, first, n = time.perf_counter(), None, 0
                try:
                    with http.stream("POST", "/chat/completions", json=body) as r:
                        if r.status_code == 429:
                            with lock:
                                rejected[0] += 1
                            time.sleep(float(r.headers.get("retry-after", 1)))
                            continue
                        r.raise_for_status()
                        for line in r.iter_lines():
                            if not line.startswith("data: {"):
                                continue
                            delta = json.loads(line[6:])["choices"]
                            if delta and delta[0].get("delta", {}).get("content"):
                                first = first or time.perf_counter()
                                n += 1
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        ttfts.append((first or time.perf_counter()) - t0)
                        chunks[0] += n
                except httpx.RemoteProtocolError:
                    # llama-server closes idle keep-alive connections; a client reusing one sees "server
                    # disconnected" before any byte, and asks again on a new one, as the openai client does
                    if first is None:
                        with lock:
                            retried[0] += 1
                        continue
                    with lock:
                        failures[0] += 1
                except Exception as exc:  # noqa: BLE001 - counted: the target is zero
                    with lock:
                        failures[0] += 1
                    print(f"    failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(clients)]
    for t in threads:
        t.start()
    give_up = stop_at + STUCK_S  # a stream the server stopped answering is counted, not waited for
    for t in threads:
        t.join(max(0.0, give_up - time.perf_counter()))
    stuck = sum(t.is_alive() for t in threads)
    elapsed = min(time.perf_counter(), give_up) - began
    if stuck:
        print(f"    {stuck} clients still waiting for an answer {STUCK_S:.0f} s after the turn: counted as failed",
              flush=True)
    return {"clients": clients, "requests": len(latencies), "failed": failures[0] + stuck, "rejected": rejected[0],
            "retried": retried[0],
            "tok_s": chunks[0] / elapsed, "req_s": len(latencies) / elapsed,
            "ttft_p50": pct(ttfts, 0.5) * 1e3, "ttft_p99": pct(ttfts, 0.99) * 1e3,
            "lat_p50": pct(latencies, 0.5) * 1e3, "lat_p99": pct(latencies, 0.99) * 1e3}


def mc_requests(n: int) -> list[str]:
    """lm-eval's requests for the first n pydoc questions: context + each choice."""
    import json

    from slimlm.data.builtin_tasks import BUILTIN_TASKS

    path = Path(slimlm.__file__).parent / "data" / "tasks" / BUILTIN_TASKS["pydoc"].file
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()[:n]]
    return [f"Question: {r['question']}\nAnswer: {c}" for r in rows for c in r["choices"]]


def mc_run(port: int, prompts: list[str]) -> tuple[float, list[list[float]]]:
    """(requests/s, the token log-probabilities of each) for echo-scoring requests, in order."""
    out = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=600) as http:
        t0 = time.perf_counter()
        for prompt in prompts:
            r = http.post("/completions", json={"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 1,
                                                "max_tokens": 0, "temperature": 0})
            r.raise_for_status()
            out.append(r.json()["choices"][0]["logprobs"]["token_logprobs"])
        return len(prompts) / (time.perf_counter() - t0), out


def serve_up(cmd: list[str], port: int):
    ready = "/v1/models" if "llama_cpp.server" in cmd else "/health"  # llama-server's /health: model loaded
    proc = start(cmd, f"http://127.0.0.1:{port}{ready}", {"SLIMLM_LOG": "warning"})
    load(port, 2, 3, 8)  # warm-up: first allocations, page cache
    return proc


def measure(name: str, port: int, clients: int, duration: float, tokens: int, first: int = 0) -> dict:
    print(f"  {name}: {clients} clients for {duration:.0f}s ...", flush=True)
    r = {"server": name, **load(port, clients, duration, tokens, first)}
    print(f"    {r['tok_s']:.1f} tok/s, {r['req_s']:.2f} req/s, TTFT p50/p99 {r['ttft_p50']:.0f}/"
          f"{r['ttft_p99']:.0f} ms, failed {r['failed']}, 429 {r['rejected']}, retried {r['retried']}", flush=True)
    return r


def run_levels(name: str, cmd: list[str], port: int, levels: list[int], duration: float, tokens: int) -> list[dict]:
    proc = serve_up(cmd, port)
    try:
        return [measure(name, port, clients, duration, tokens, 10**4 * clients) for clients in levels]
    finally:
        proc.terminate()
        proc.wait(30)


def interleaved(servers: dict, levels: dict, rounds: int, duration: float, tokens: int) -> list[dict]:
    """Every server up at once (an idle one costs nothing); at each level they take turns, the
    order alternating between rounds, so a slower moment of a shared machine hurts all alike.
    Rows are the rounds' sums (requests, failures) and means (rates, percentiles)."""
    procs = {name: (serve_up(cmd, port), port) for name, (cmd, port) in servers.items()}
    rows = []
    try:
        for clients in sorted({c for lv in levels.values() for c in lv}):
            names = [n for n in servers if clients in levels[n]]
            runs = {n: [] for n in names}
            for r in range(rounds):
                first = 10**6 * (r + 1) + 10**4 * clients  # the same texts for every server in a round, new each round
                for n in (names if r % 2 == 0 else names[::-1]):
                    runs[n].append(measure(n, procs[n][1], clients, duration, tokens, first))
            for n in names:
                rs = runs[n]
                row = {"server": n, "clients": clients}
                for key in ("requests", "failed", "rejected", "retried"):
                    row[key] = sum(x[key] for x in rs)
                for key in ("tok_s", "req_s", "ttft_p50", "ttft_p99", "lat_p50", "lat_p99"):
                    row[key] = statistics.mean(x[key] for x in rs)
                rows.append(row)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # llama-server, stuck with streams open, ignores SIGTERM here
                proc.kill()
                proc.wait(30)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=30, help="seconds per level")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per answer")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--peer-levels", default="1", help="levels for llama_cpp.server: it serializes requests, and "
                    "at 4 concurrent clients it answered near-empty streams here (bench/RESULTS.md, 2026-12-07)")
    ap.add_argument("--parallel", type=int, default=16, help="slots for both slimlm and llama-server")
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--queue-size", type=int, default=64, help="slimlm's queue beyond the slots")
    ap.add_argument("--rounds", type=int, default=2, help="turns per server at each level (order alternates)")
    ap.add_argument("--mc", type=int, default=0, help="multiple-choice questions for the prefix-cache run")
    ap.add_argument("--choose", action="store_true", help="first measure slimlm's --parallel / --batch-tokens")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    path, cpu = resolve(MODEL).path, cpu_info()
    levels = [int(c) for c in args.clients.split(",")]
    peer_levels = [int(c) for c in args.peer_levels.split(",") if c]
    print(f"{MODEL} ({path.name}) on {cpu.describe()}; {default_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    build((*TOOLS, SERVER))
    rows, choice = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if args.choose:
            for parallel in (4, 8, 16):
                for bt in (256, 512):
                    port = free_port()
                    choice += run_levels(f"slimlm -np {parallel} --batch-tokens {bt}",
                                         slimlm_cmd(port, Path(tmp), parallel, bt, args.queue_size), port, [16],
                                         args.duration, args.tokens)
        mc = {}
        if args.mc:
            prompts = mc_requests(args.mc)
            for label, extra in (("with prefix cache", []), ("--no-prefix-cache", ["--no-prefix-cache"])):
                port = free_port()
                proc = start(slimlm_cmd(port, Path(tmp), args.parallel, args.batch_tokens, args.queue_size) + extra,
                             f"http://127.0.0.1:{port}/health", {"SLIMLM_LOG": "warning"})
                try:
                    mc_run(port, prompts[:8])  # warm-up: the scorer's handle opens on the first request
                    mc[label] = mc_run(port, prompts)
                    print(f"  MC {label}: {mc[label][0]:.2f} requests/s", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(30)
        ports = [free_port() for _ in range(3)]
        servers = {"slimlm serve": (slimlm_cmd(ports[0], Path(tmp), args.parallel, args.batch_tokens,
                                               args.queue_size), ports[0]),
                   "llama-server": (llama_server_cmd(ports[1], path, args.parallel, args.batch_tokens), ports[1])}
        wanted = {"slimlm serve": levels, "llama-server": levels}
        if peer_levels:
            servers["llama_cpp.server"] = (peer_cmd(ports[2]), ports[2])
            wanted["llama_cpp.server"] = peer_levels
        rows += interleaved(servers, wanted, args.rounds, args.duration, args.tokens)
    head = ["| server | clients | requests | failed | 429s | reconnects | completion tok/s | requests/s | TTFT p50 ms | "
            "TTFT p99 ms | latency p50 ms | latency p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def line(r):
        return (f"| {r['server']} | {r['clients']} | {r['requests']} | {r['failed']} | {r['rejected']} | "
                f"{r.get('retried', 0)} | "
                f"{r['tok_s']:.1f} | {r['req_s']:.2f} | {r['ttft_p50']:.0f} | {r['ttft_p99']:.0f} | "
                f"{r['lat_p50']:.0f} | {r['lat_p99']:.0f} |")

    body = (head + [line(r) for r in choice] + [""]) if choice else []
    body += head + [line(r) for r in rows]
    ours = {r["clients"]: r for r in rows if r["server"] == "slimlm serve"}
    peer = {r["clients"]: r for r in rows if r["server"] == "llama-server"}
    body.append("")
    for c in levels:
        if c in ours and c in peer:
            o, p = ours[c], peer[c]
            body.append(f"- {c} clients: throughput {o['tok_s'] / p['tok_s']:.2f}x llama-server's (target >= 1.0x); "
                        f"TTFT p99 {o['ttft_p99']:.0f} vs {p['ttft_p99']:.0f} ms; failures {o['failed']} / "
                        f"{p['failed']}")
    if choice:
        best = max(choice, key=lambda r: r["tok_s"])
        body.append(f"- default chosen by measurement at 16 clients: {best['server']} "
                    f"({best['tok_s']:.1f} tok/s, TTFT p99 {best['ttft_p99']:.0f} ms)")
    if mc:
        (on, lp_on), (off, lp_off) = mc["with prefix cache"], mc["--no-prefix-cache"]
        body += ["", "| lm-eval multiple-choice requests (echo scoring), one client | requests/s |", "|---|---:|",
                 f"| slimlm serve, prefix cache on | {on:.2f} |", f"| slimlm serve --no-prefix-cache | {off:.2f} |",
                 "", f"- prefix cache: {on / off:.2f}x the requests/s on {len(lp_on)} requests ({args.mc} questions); "
                 f"log-probabilities identical: {lp_on == lp_off}"]
    body.append(f"- load average at the end {os.getloadavg()[0]:.1f} on {cpu.physical_cores} cores")
    print("\n" + "\n".join(body), flush=True)
    if not args.no_write:
        desc = (f"SmolLM2-135M-Instruct ({path.name}), streaming chat, greedy, {args.tokens} new tokens, "
                f"{args.duration:.0f} s per turn, {args.rounds} alternating rounds per level (means); "
                f"slimlm `--parallel {args.parallel} --batch-tokens "
                f"{args.batch_tokens} --queue-size {args.queue_size}`, llama-server `-np {args.parallel} -b "
                f"{args.batch_tokens} -fa off` with {CTX} tokens per slot (built by bench/llama_tools.py from the "
                f"same vendored llama.cpp and flags), llama_cpp.server as in bench/serve.py; {default_threads()} "
                f"threads each. Tokens/s counts content chunks (one per token). Command: `python "
                f"bench/serve_load.py {' '.join(sys.argv[1:])}`.")
        print(f"appended to {append_section('serve, under load', desc, body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
