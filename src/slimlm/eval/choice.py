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
from slimlm.eval.loglik import Request, Scorer
from slimlm.eval.prompts import build_prompt, pick_shots
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


def _items(spec: TaskSpec, records: list[dict]) -> tuple[list[list[str]], list[int]]:
    if spec.kind == "multiple_choice":
        return [[str(c) for c in r["choices"]] for r in records], [int(r["answer"]) for r in records]
    labels = spec.labels or sorted({str(r["label"]) for r in records})
    if len(labels) < 2:
        raise SlimlmError(f"{spec.data}: classification needs at least two labels; the data has only {labels}")
    spec.labels = labels
    return [labels] * len(records), [labels.index(str(r["label"])) for r in records]


def run_choice(scorer: Scorer, backend, spec: TaskSpec, records: list[dict], *, shots: int = 0,
               seed: int = 0, chat: bool = False) -> EvalResult:
    choices, answers = _items(spec, records)
    delimiter = "" if chat else spec.target_delimiter
    requests, owners = [], []
    for i, record in enumerate(records):
        shot_pairs = [(s, str(s["choices"][s["answer"]]) if spec.kind == "multiple_choice" else str(s["label"]))
                      for s in pick_shots(records, i, shots, seed)]
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
    correct = np.array(predicted) == np.array(answers)
    details = [{"index": i, "answer": answers[i], "predicted": predicted[i], "predicted_norm": predicted_norm[i],
                "loglik": [round(float(x), 4) for x in sums[i]]} for i in range(len(records))]
    if spec.kind == "multiple_choice":
        metrics = {"acc": float(correct.mean()),
                   "acc_norm": float(np.mean(np.array(predicted_norm) == np.array(answers)))}
    else:
        from sklearn.metrics import f1_score

        metrics = {"acc": float(correct.mean()),
                   "macro_f1": float(f1_score(answers, predicted, average="macro",
                                              labels=list(range(len(spec.labels or []))), zero_division=0))}
    return EvalResult(task=spec.name, kind=spec.kind, model="", backend=scorer.name, metrics=metrics,
                      primary="acc", higher_is_better=True, examples=len(records),
                      params={"shots": shots, "seed": seed, "chat": chat, "labels": spec.labels}, details=details)
