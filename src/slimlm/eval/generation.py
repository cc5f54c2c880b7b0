"""Generation tasks: the model writes an answer, scorers compare it with the reference(s).

Greedy decoding, so a run is repeatable; `max_tokens` and `stop` come from the task. The answer
that is scored is the part that `extract` picks out (e.g. the number after "answer is"), or the
whole answer. Every scorer named by the task is reported; the first is the headline.
"""

from __future__ import annotations

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.eval.kinds import EvalOptions, register_task_kind
from slimlm.eval.prompts import FileTaskKind, build_prompt, pick_shots, references, use_chat
from slimlm.eval.result import EvalResult
from slimlm.eval.scorers import best_score, extract, get_scorer
from slimlm.eval.tasks import TaskSpec
from slimlm.models.backends import GenerationParams
from slimlm.progress import progress_bar


@register_task_kind("generation")
class Generation(FileTaskKind):
    help = "generation:FILE.jsonl  generated answers scored against references"
    template = "{prompt}"

    def check_spec(self, spec: TaskSpec, where: str) -> None:
        if not spec.scorers:
            raise SlimlmError(f"{where}: 'scorers' is empty: list at least one (e.g. exact_match)")
        for name in spec.scorers:
            try:
                get_scorer(name)
            except SlimlmError as exc:
                raise SlimlmError(f"{where}: {exc}") from None

    def check_record(self, spec: TaskSpec, record: dict) -> str | None:
        refs = record.get("references", record.get("reference"))
        if refs is None:
            return "missing field 'reference' (or 'references')"
        if isinstance(refs, list) and not refs:
            return "'references' is empty"
        return None

    def run(self, spec: TaskSpec, records: list[dict], backend, options: EvalOptions) -> EvalResult:
        return run_generation(backend, spec, records, shots=options.shots, seed=options.seed,
                              chat=use_chat(spec, options.chat, backend, generating=True))


def run_generation(backend, spec: TaskSpec, records: list[dict], *, shots: int = 0, seed: int = 0,
                   chat: bool = False) -> EvalResult:
    scorers = {name: get_scorer(name) for name in spec.scorers}
    stop = list(spec.stop) or ([] if chat else ["\n\n"])
    params = GenerationParams(max_tokens=spec.max_tokens, temperature=0.0, seed=seed, stop=stop).validate()
    scores = {name: [] for name in scorers}
    details, generated = [], 0
    with progress_bar(spec.name, len(records)) as advance:
        for i, record in enumerate(records):
            shot_pairs = [(s, references(s)[0]) for s in pick_shots(records, i, shots, seed)]
            prompt = build_prompt(spec, backend, record, shot_pairs, chat)
            completion = backend.generate(prompt, params, raw=True)
            generated += completion.timings.generated_tokens
            answer = extract(completion.text.strip(), spec.extract)
            refs = references(record)
            row = {"index": i, "output": completion.text[:2000], "answer": answer, "references": refs}
            for name, scorer in scorers.items():
                value = best_score(scorer, answer, refs)
                scores[name].append(value)
                row[name] = value
            details.append(row)
            advance()
    metrics = {name: float(np.mean(values)) for name, values in scores.items()}
    metrics["generated_tokens"] = generated
    return EvalResult(task=spec.name, kind="generation", model="", backend=backend.label, metrics=metrics,
                      primary=spec.scorers[0], higher_is_better=True, examples=len(records),
                      params={"shots": shots, "seed": seed, "chat": chat, "scorers": spec.scorers,
                              "extract": spec.extract, "max_tokens": spec.max_tokens}, details=details)
