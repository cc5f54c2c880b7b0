"""`slimlm batch`: a file of OpenAI batch requests through the same server, resumably.

Input is OpenAI's batch file format, one request per line:
    {"custom_id": "t1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
and output is OpenAI's batch output format, one line per request, in input order:
    {"id": "batch_req_...", "custom_id": "t1", "response": {"status_code": 200, "request_id": ...,
     "body": {...}}, "error": null}

Why through the app: each request goes to the very routes `slimlm serve` answers (validation,
chat templates, stop strings, logprobs, the continuous-batching engine), in-process through
httpx's ASGI transport, so a batch answers exactly what the server would and nothing is written
twice. As many requests are in flight as the engine has slots plus its queue, so the batch keeps
every slot busy.

Resume: each answer is appended to OUT's `.partial` file and flushed as it arrives; a rerun
skips the custom_ids found there (a line cut off by a kill is dropped and asked again), and OUT
appears, in input order, by one rename when every request has an answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from slimlm.data.jsonl import JsonlReport, read_jsonl
from slimlm.errors import SlimlmError

URLS = ("/v1/chat/completions", "/v1/completions")


def _check(record: dict) -> str | None:
    if not isinstance(record["custom_id"], str) or not record["custom_id"]:
        return "custom_id must be a non-empty string"
    if record.get("method", "POST") != "POST":
        return f"method {record.get('method')!r}: batch requests are POST"
    if record["url"] not in URLS:
        return f"url {record['url']!r}: one of {', '.join(URLS)}"
    if not isinstance(record["body"], dict):
        return "body must be a JSON object"
    return None


def read_requests(path: Path, skip_bad_lines: bool = False, report: JsonlReport | None = None) -> list[dict]:
    """The requests of a batch file, checked line by line (file:line errors); custom_ids unique."""
    records = read_jsonl(path, ("custom_id", "url", "body"), skip_bad_lines, report, _check)
    seen: set[str] = set()
    for r in records:
        if r["custom_id"] in seen:
            raise SlimlmError(f"{path}: custom_id {r['custom_id']!r} appears twice: each request needs its own")
        seen.add(r["custom_id"])
    return records


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def finished(out: Path) -> dict[str, dict]:
    """Answers already in OUT's .partial file (a cut-off last line is dropped: asked again)."""
    path = _partial(out)
    done: dict[str, dict] = {}
    if not path.exists():
        return done
    good = 0
    with path.open("rb") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except ValueError:
                break
            if not line.endswith(b"\n"):
                break
            done[row["custom_id"]] = row
            good += len(line)
    if good < path.stat().st_size:
        with path.open("r+b") as fh:
            fh.truncate(good)
    return done


@dataclass
class BatchProgress:
    total: int
    done: int = 0
    failed: int = 0
    completion_tokens: int = 0
    skipped_lines: list[str] = field(default_factory=list)


async def _run(app, requests: list[dict], out: Path, concurrency: int, progress: BatchProgress, on_answer) -> None:
    import httpx

    transport = httpx.ASGITransport(app=app)
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    lock = asyncio.Lock()
    with _partial(out).open("a", encoding="utf-8") as sink:
        async with httpx.AsyncClient(transport=transport, base_url="http://slimlm-batch", timeout=None) as client:

            async def worker() -> None:
                while not queue.empty():
                    req = queue.get_nowait()
                    body = {**req["body"], "stream": False}
                    while True:
                        response = await client.post(req["url"], json=body)
                        if response.status_code != 429:  # the queue is full: wait and ask again
                            break
                        await asyncio.sleep(float(response.headers.get("retry-after", 1)))
                    row = answer_row(req["custom_id"], response)
                    async with lock:
                        sink.write(json.dumps(row) + "\n")
                        sink.flush()
                        on_answer(row)

            await asyncio.gather(*(worker() for _ in range(concurrency)))


def answer_row(custom_id: str, response) -> dict:
    """One output line in OpenAI's batch format."""
    rid = f"batch_req_{uuid.uuid4().hex[:24]}"
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": {"message": response.text[:500]}}
    if response.status_code == 200:
        return {"id": rid, "custom_id": custom_id, "error": None,
                "response": {"status_code": 200, "request_id": rid, "body": payload}}
    return {"id": rid, "custom_id": custom_id, "response": {"status_code": response.status_code, "request_id": rid,
                                                            "body": payload},
            "error": {"code": (payload.get("error") or {}).get("code"),
                      "message": (payload.get("error") or {}).get("message")}}


def run_batch(engine, in_path: Path, out: Path, *, skip_bad_lines: bool = False, force: bool = False,
              on_start=None, on_answer=None) -> BatchProgress:
    """Answer every request of `in_path` with `engine` (a serve.Engine) into `out`; see the module
    docstring. on_start(progress) before the first request, on_answer(row) after each answer."""
    from slimlm.serve.api import create_app
    from slimlm.serve.config import ServeConfig

    in_path, out = Path(in_path), Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} exists: pass --force to replace it, or choose another --out")
    report = JsonlReport()
    requests = read_requests(in_path, skip_bad_lines, report)
    done = finished(out)
    stale = set(done) - {r["custom_id"] for r in requests}
    if stale:
        raise SlimlmError(f"{_partial(out)} holds answers to requests not in {in_path} (e.g. {sorted(stale)[0]!r}): "
                          "it belongs to another batch; delete it to start over")
    todo = [r for r in requests if r["custom_id"] not in done]
    progress = BatchProgress(total=len(requests), done=len(done), skipped_lines=report.skipped)
    for row in done.values():
        _count(progress, row)
    if on_start:
        on_start(progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    _partial(out).touch()
    app = create_app(engine, ServeConfig(queue_size=engine.queue_size, max_tokens_cap=1 << 20))

    def answered(row: dict) -> None:
        progress.done += 1
        _count(progress, row)
        if on_answer:
            on_answer(row)

    concurrency = max(1, engine.parallel) + engine.queue_size
    if todo:
        asyncio.run(_run(app, todo, out, concurrency, progress, answered))
    rows = finished(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in requests:
            fh.write(json.dumps(rows[r["custom_id"]]) + "\n")
    os.replace(tmp, out)
    _partial(out).unlink()
    return progress


def _count(progress: BatchProgress, row: dict) -> None:
    if row.get("error"):
        progress.failed += 1
        return
    usage = (row["response"]["body"] or {}).get("usage") or {}
    progress.completion_tokens += usage.get("completion_tokens") or 0
