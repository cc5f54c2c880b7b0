"""Multiple choice and classification, by the log-likelihood of each answer.

For each question the model scores every choice as a continuation of the prompt; the prediction
is the most likely one. As in lm-evaluation-harness, `acc` sums the choice's token
log-probabilities and `acc_norm` divides that sum by the choice's length in characters, which
removes the bias toward short answers. Classification is the same computation with the task's
labels as the choices; it reports accuracy and macro-F1 (scikit-learn).
"""

from __future__ import annotations

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.eval.kinds import EvalOptions, get_task_kind, register_task_kind
from slimlm.eval.loglik import Request, Scorer
from slimlm.eval.prompts import FileTaskKind, build_prompt, pick_shots, use_chat
from slimlm.eval.result import EvalResult
from slimlm.eval.tasks import TaskSpec
from slimlm.progress import progress_bar


def continuation_request(scorer: Scorer, context: str, continuation: str) -> Request:
    """Tokens of context + continuation, split where the context's own tokens end (so a merge
    across the boundary is scored as the model would see it, as lm-evaluation-harness does)."""
    ctx = scorer.encode_prompt(context) if context else []
    whole = scorer.encode_prompt(context + continuation)
    if ctx and whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx):]
    else:
        cont = scorer.encode(continuation)
    if not cont:
        raise SlimlmError(f"the answer {continuation!r} is empty after tokenization: give every choice some text")
    if not ctx:
        ctx = [scorer.prefix_id]
    return Request(ctx + cont, len(ctx))


class ChoiceKind(FileTaskKind):
    """Multiple choice and classification: pick the most likely of a few answers."""

    needs_loglik = True

    def items(self, spec: TaskSpec, records: list[dict]) -> tuple[list[list[str]], list[int]]:
        """Each record's candidate answers, and the index of the right one."""
        raise NotImplementedError

    def answer_text(self, record: dict) -> str:
        """The right answer's text (a few-shot example shows it)."""
        raise NotImplementedError

    def metrics(self, spec: TaskSpec, answers: list[int], predicted: list[int], predicted_norm: list[int]) -> dict:
        return {"acc": float(np.mean(np.array(predicted) == np.array(answers)))}

    def run(self, spec: TaskSpec, records: list[dict], backend, options: EvalOptions) -> EvalResult:
        scorer = self.scorer(backend, options)
        return run_choice(scorer, backend, spec, records, shots=options.shots, seed=options.seed,
                          chat=use_chat(spec, options.chat, backend, generating=False))


@register_task_kind("multiple_choice")
class MultipleChoice(ChoiceKind):
    help = "multiple_choice:FILE.jsonl  accuracy by the log-likelihood of each choice"
    template = "Question: {question}\nAnswer:"
    answer_fields = ("choices", "answer")

    def check_record(self, spec: TaskSpec, record: dict) -> str | None:
        choices, answer = record["choices"], record["answer"]
        if not isinstance(choices, list) or len(choices) < 2:
            return "'choices' must be a list of at least two answers"
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            return f"'answer' must be the index of the right choice (0 to {len(choices) - 1})"
        return None

    def items(self, spec, records):
        return [[str(c) for c in r["choices"]] for r in records], [int(r["answer"]) for r in records]

    def answer_text(self, record: dict) -> str:
        return str(record["choices"][record["answer"]])

    def metrics(self, spec, answers, predicted, predicted_norm):
        return {**super().metrics(spec, answers, predicted, predicted_norm),
                "acc_norm": float(np.mean(np.array(predicted_norm) == np.array(answers)))}


@register_task_kind("classification")
class Classification(ChoiceKind):
    help = "classification:FILE.jsonl  the most likely label, by log-likelihood"
    template = "{text}\nLabel:"
    answer_fields = ("label",)

    def check_record(self, spec: TaskSpec, record: dict) -> str | None:
        if spec.labels is not None and str(record["label"]) not in spec.labels:
            return f"label '{record['label']}' is not one of the task's labels ({', '.join(spec.labels)})"
        return None

    def items(self, spec, records):
        labels = spec.labels or sorted({str(r["label"]) for r in records})
        if len(labels) < 2:
            raise SlimlmError(f"{spec.data}: classification needs at least two labels; the data has only {labels}")
        spec.labels = labels
        return [labels] * len(records), [labels.index(str(r["label"])) for r in records]

    def answer_text(self, record: dict) -> str:
        return str(record["label"])

    def metrics(self, spec, answers, predicted, predicted_norm):
        from sklearn.metrics import f1_score

        return {**super().metrics(spec, answers, predicted, predicted_norm),
                "macro_f1": float(f1_score(answers, predicted, average="macro",
                                           labels=list(range(len(spec.labels or []))), zero_division=0))}


def run_choice(scorer: Scorer, backend, spec: TaskSpec, records: list[dict], *, shots: int = 0,
               seed: int = 0, chat: bool = False) -> EvalResult:
    kind = get_task_kind(spec.kind)
    choices, answers = kind.items(spec, records)
    delimiter = "" if chat else spec.target_delimiter
    requests, owners = [], []
    for i, record in enumerate(records):
        shot_pairs = [(s, kind.answer_text(s)) for s in pick_shots(records, i, shots, seed)]
        context = build_prompt(spec, backend, record, shot_pairs, chat)
        for j, choice in enumerate(choices[i]):
            requests.append(continuation_request(scorer, context, delimiter + choice))
            owners.append((i, j))
    sums = [np.full(len(c), -np.inf) for c in choices]
    chunk = 16
    with progress_bar(spec.name, len(records)) as advance:
        for first in range(0, len(requests), chunk):
            for (i, j), scored in zip(owners[first:first + chunk], scorer.score(requests[first:first + chunk])):
                sums[i][j] = scored.logprobs.sum()
                if j == len(choices[i]) - 1:
                    advance()
    predicted = [int(np.argmax(s)) for s in sums]
    lengths = [np.array([max(len(c), 1) for c in cs], dtype=float) for cs in choices]
    predicted_norm = [int(np.argmax(s / n)) for s, n in zip(sums, lengths)]
    details = [{"index": i, "answer": answers[i], "predicted": predicted[i], "predicted_norm": predicted_norm[i],
                "loglik": [round(float(x), 4) for x in sums[i]]} for i in range(len(records))]
    return EvalResult(task=spec.name, kind=spec.kind, model="", backend=scorer.name,
                      metrics=kind.metrics(spec, answers, predicted, predicted_norm),
                      primary="acc", higher_is_better=True, examples=len(records),
                      params={"shots": shots, "seed": seed, "chat": chat, "labels": spec.labels}, details=details)
