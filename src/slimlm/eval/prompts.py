"""Turning task records into prompts: validation, few-shot examples and the chat template, and
the base class of the task kinds that read a JSONL task file (FileTaskKind).

One place builds every prompt so that multiple choice, classification and generation agree on
what `--shots` and `--chat` mean:
- raw (no chat template): description, then each shot as "<prompt><delimiter><answer>" separated
  by blank lines, then the question's prompt; the answer follows after the delimiter.
- chat: the description as a system message, each shot as a user/assistant exchange, and the
  question as the last user turn, rendered with the model's own template; the answer is what the
  assistant says first.
"""

from __future__ import annotations

import random
from pathlib import Path

from slimlm.data import JsonlReport, builtin_task, read_jsonl
from slimlm.errors import SlimlmError
from slimlm.eval.kinds import EvalOptions, TaskKind, get_task_kind
from slimlm.eval.tasks import TaskSpec


class FileTaskKind(TaskKind):
    """The base of the kinds whose data is a JSONL task file (multiple_choice, classification,
    generation): `KIND:FILE.jsonl` or a task file's `kind:` names them, the records are read and
    checked by `check_record` before a model is loaded, and `--limit` keeps the first ones.
    `KIND:NAME` with the name of a built-in task set of that kind (slimlm.data.BUILTIN_TASKS,
    e.g. `multiple_choice:pydoc`) reads the file that ships with slimlm; the name wins over a
    file of the same name, as a built-in corpus does for perplexity."""

    takes_file = True

    def parse(self, argument: str) -> TaskSpec:
        builtin = builtin_task(self.name, argument)
        if builtin is not None:
            return TaskSpec(name=argument, kind=self.name, data=builtin.path)
        return TaskSpec(name=Path(argument).stem, kind=self.name, data=Path(argument))

    def load(self, argument: TaskSpec, options: EvalOptions, report: JsonlReport) -> list[dict]:
        records = load_examples(argument, skip_bad_lines=options.skip_bad_lines, report=report)
        return records[:options.limit] if options.limit else records


def load_examples(spec: TaskSpec, skip_bad_lines: bool = False, report: JsonlReport | None = None) -> list[dict]:
    kind = get_task_kind(spec.kind)
    return read_jsonl(spec.data, required=spec.required_fields, skip_bad_lines=skip_bad_lines, report=report,
                      check=lambda record: kind.check_record(spec, record))


def references(record: dict) -> list[str]:
    refs = record.get("references", record.get("reference"))
    return [str(r) for r in refs] if isinstance(refs, list) else [str(refs)]


def pick_shots(records: list[dict], index: int, shots: int, seed: int) -> list[dict]:
    """`shots` examples other than record `index`, the same ones for the same seed and index."""
    if shots == 0:
        return []
    if shots > len(records) - 1:
        raise SlimlmError(f"--shots {shots} needs at least {shots + 1} examples in the task; it has {len(records)}")
    rng = random.Random(seed * 1_000_003 + index)
    pool = [i for i in range(len(records)) if i != index]
    return [records[i] for i in rng.sample(pool, shots)]


def build_prompt(spec: TaskSpec, backend, record: dict, shots: list[tuple[dict, str]], chat: bool) -> str:
    """The text before the answer. `shots` pairs each example with its answer text."""
    if chat:
        if not backend.chat_template:
            raise SlimlmError("this model has no chat template: run the task without --chat")
        messages = [{"role": "system", "content": spec.description}] if spec.description else []
        for shot, answer in shots:
            messages += [{"role": "user", "content": spec.render(shot)}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": spec.render(record)})
        return backend.render_chat(messages)
    parts = [spec.description] if spec.description else []
    parts += [f"{spec.render(shot)}{spec.target_delimiter}{answer}" for shot, answer in shots]
    parts.append(spec.render(record))
    return "\n\n".join(parts)


def use_chat(spec: TaskSpec, chat: bool | None, backend, generating: bool) -> bool:
    """Command line over task file; by default, generation talks to chat models through their
    template and log-likelihood scoring does not (lm-evaluation-harness's default)."""
    choice = chat if chat is not None else spec.chat
    if choice is None:
        return generating and bool(backend.chat_template)
    return choice
