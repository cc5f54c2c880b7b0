"""`slimlm synth`: a teacher writes training data, Cosmopedia style.

- textbook: one passage per (topic x audience x format) prompt (prompts/synth_textbook.txt),
  topics from your file (one per line) or the built-in seeds (the titles of Python's reference
  topics, pydoc_data.topics, which ship with every Python);
- qa: question/answer pairs grounded in your documents (prompts/synth_qa.txt), each passage cut
  to `max_chars`, `k` pairs asked per passage.

Jobs are fixed by the settings (a seeded sample of the prompt grid), sent to a URL `batch` at a
time (concurrent requests, which a serving engine batches), each batch's answers appended to a
work file as they arrive, so a killed run, or a teacher that stays away after its retries,
continues where it stopped when the same command is rerun. The output is then deduplicated
against itself (exact and MinHash) and decontaminated against every eval task by `curate`, and
written as chat JSONL that `finetune` and `distill` read as it is (OUT/train.jsonl).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimlm.errors import SlimlmError

PROMPTS = Path(__file__).resolve().parent / "prompts"
AUDIENCES = ("high school students", "college students", "professionals new to the field", "curious adults")
FORMATS = ("textbook section", "tutorial with a worked example", "set of exercises with solutions",
           "clear explanatory article")
MODES = ("textbook", "qa")
_PAIR = re.compile(r"^\s*Q:\s*(.+?)\s*\n\s*A:\s*(.+?)\s*(?=\n\s*Q:|\Z)", re.S | re.M)


@dataclass
class SynthOptions:
    mode: str = "textbook"
    n: int = 100  # textbook: passages; qa: passages of your documents asked about
    topics: str | None = None  # textbook: a file, one topic per line (default: Python's reference topics)
    docs: list[str] = field(default_factory=list)  # qa: files or folders, read as `curate` reads them
    audiences: list[str] = field(default_factory=lambda: list(AUDIENCES))
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    k: int = 3  # qa: pairs per passage
    max_chars: int = 3000  # qa: of each passage
    max_tokens: int = 768  # the teacher's longest answer
    batch: int = 4  # prompts sent at once to a URL (answers are kept after each batch)
    prompt: str | None = None  # your own template file (textbook: {topic} {audience} {format}; qa: {text} {k})
    seed: int = 0
    teacher_model: str | None = None  # the `model` field sent to a URL
    api_key_env: str | None = None
    retries: int = 4
    backoff_s: float = 1.0
    tokenizer: str = "smollm2-135m-instruct"  # counts tokens in the report (or `words`)
    executor: str = "local"  # where the dedup and decontamination run: local, or ray
    address: str | None = None  # a Ray cluster's address (executor ray)


def builtin_topics() -> list[str]:
    """The title line of each of Python's reference topics (pydoc_data.topics), as topics."""
    from pydoc_data.topics import topics

    titles = []
    for key in sorted(topics):
        first = topics[key].strip().splitlines()[0].strip()
        titles.append(f"Python: {first}" if first else f"Python: {key}")
    return list(dict.fromkeys(titles))


def _job_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def plan_jobs(options: SynthOptions) -> list[dict]:
    """[{id, prompt, meta}], the same list for the same settings and inputs."""
    rng = random.Random(options.seed)
    template = Path(options.prompt).read_text() if options.prompt else None
    if options.mode == "textbook":
        template = template or (PROMPTS / "synth_textbook.txt").read_text()
        if options.topics:
            path = Path(options.topics)
            if not path.is_file():
                raise SlimlmError(f"--topics {path}: no such file: give a text file with one topic per line")
            topics = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            topics = builtin_topics()
        if not topics:
            raise SlimlmError(f"--topics {options.topics}: no topics in the file")
        grid = list(itertools.product(topics, options.audiences, options.formats))
        rng.shuffle(grid)
        jobs = [{"prompt": template.format(topic=t, audience=a, format=f),
                 "meta": {"mode": "textbook", "topic": t, "audience": a, "format": f}} for t, a, f in grid[:options.n]]
    else:
        from slimlm.curate.ingest import file_records, input_files

        template = template or (PROMPTS / "synth_qa.txt").read_text()
        if not options.docs:
            raise SlimlmError("qa mode needs --docs: the files or folders to ask questions about")
        passages = []
        for path in input_files(options.docs):
            for line, record in file_records(path, "text"):
                if isinstance(record, dict):
                    passages += [(f"{path}:{line}", chunk) for chunk in _chunks(record["text"], options.max_chars)]
        rng.shuffle(passages)
        jobs = [{"prompt": template.replace("{text}", text).replace("{k}", str(options.k)),
                 "meta": {"mode": "qa", "document": source}} for source, text in passages[:options.n]]
    for job in jobs:
        job["id"] = _job_id(job["prompt"])
    return jobs


def _chunks(text: str, max_chars: int) -> list[str]:
    """Paragraphs joined up to max_chars (a longer paragraph is cut)."""
    chunks, current = [], ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if current and len(current) + len(para) + 2 > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para[:max_chars]
    return chunks + ([current] if current else [])


def to_records(job: dict, answer: str, k: int) -> list[dict]:
    """The chat records one answer gives: a passage (textbook), or its Q/A pairs (qa)."""
    answer = answer.strip()
    if not answer:
        return []
    if job["meta"]["mode"] == "textbook":
        return [{"messages": [{"role": "user", "content": job["prompt"].strip()},
                              {"role": "assistant", "content": answer}], "metadata": job["meta"]}]
    pairs = _PAIR.findall(answer)[:k]
    return [{"messages": [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}],
             "metadata": job["meta"]} for q, a in pairs]


def synth(teacher: str, out: str | Path, options: SynthOptions | None = None, force: bool = False,
          say=print, progress=None) -> dict:
    """Generate, deduplicate and decontaminate; OUT/train.jsonl, OUT/synth.json and curate's files."""
    from slimlm.curate.run import RunOptions, curate
    from slimlm.curate.teacher import Teacher, TeacherStopped

    options = options or SynthOptions()
    if options.mode not in MODES:
        raise SlimlmError(f"unknown mode {options.mode!r}: choose one of {', '.join(MODES)}")
    if options.n < 1 or options.k < 1:
        raise SlimlmError("--n and --k must be at least 1")
    out = Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another --out or pass --force to replace it")
    jobs = plan_jobs(options)
    work = out.parent / f".{out.name}.synth"
    work.mkdir(parents=True, exist_ok=True)
    answers = work / "answers.jsonl"
    done = {json.loads(line)["id"] for line in answers.read_text().splitlines() if line.strip()} \
        if answers.exists() else set()
    todo = [j for j in jobs if j["id"] not in done]
    say(f"{len(jobs)} prompts, {len(done)} answered before, {len(todo)} to ask {teacher}")
    client = Teacher(teacher, api_key_env=options.api_key_env, model_name=options.teacher_model,
                     max_tokens=options.max_tokens, retries=options.retries, backoff_s=options.backoff_s)
    written = 0
    try:
        with answers.open("a", encoding="utf-8") as f:
            for start in range(0, len(todo), options.batch):
                batch = todo[start:start + options.batch]
                stopped = None
                try:
                    got = client.ask_many([j["prompt"] for j in batch])
                except TeacherStopped as exc:  # keep what did come back of this batch, then stop
                    got, stopped = exc.answers, exc
                for job, answer in zip(batch, got):
                    if answer is not None:
                        f.write(json.dumps({"id": job["id"], "answer": answer}, ensure_ascii=False) + "\n")
                        written += 1
                f.flush()
                if stopped is not None:
                    raise stopped
                if progress:
                    progress(written, len(todo))
    except SlimlmError as exc:
        raise SlimlmError(f"{exc}: {len(done) + written} of {len(jobs)} answers are kept in {answers}; rerun the "
                          "same command to continue") from None
    finally:
        client.close()
    by_id = {j["id"]: j for j in jobs}
    records = []
    for line in answers.read_text().splitlines():
        row = json.loads(line)
        if row["id"] in by_id:
            records += to_records(by_id[row["id"]], row["answer"], options.k)
    if not records:
        raise SlimlmError(f"the teacher's {len(jobs)} answers gave no records (empty, or no Q:/A: pairs): check "
                          f"{answers} and the prompt")
    raw = work / "generated.jsonl"
    raw.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    recipe = {"description": "slimlm synth: the teacher's output, deduplicated and decontaminated",
              "tokenizer": options.tokenizer, "steps": ["exact_dedup", "near_dedup", "decontaminate"]}
    result = curate(recipe, [raw], out, RunOptions(tasks=2, executor=options.executor, address=options.address),
                    force=force, say=say)
    kept = _chat_records(out / "data")
    (out / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    summary = {"teacher": teacher, "options": asdict(options), "prompts": len(jobs), "records": len(records),
               "kept": len(kept), "funnel": result.funnel}
    (out / "synth.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _chat_records(folder: Path) -> list[dict]:
    from slimlm.curate.ingest import read_shards

    rows = []
    for r in read_shards(folder):
        meta = {k: v for k, v in r["metadata"].items() if k not in ("chat", "line", "source", "token_count")}
        rows.append({"messages": r["messages"], "metadata": meta})
    return rows
