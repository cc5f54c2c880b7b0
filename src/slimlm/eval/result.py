"""What every evaluation returns, and how it is stored in the run registry.

One shape for every task kind keeps `compare` and `report` ignorant of tasks: they read the
headline metric named by `primary` and its direction, and the systems numbers beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EvalResult:
    task: str  # as the user named it, e.g. "perplexity:python-docs" or "tasks/capitals.yaml"
    kind: str  # perplexity | multiple_choice | generation | classification | humaneval
    model: str
    backend: str
    metrics: dict[str, float]  # quality numbers; `primary` is one of the keys
    primary: str  # the headline metric, e.g. "perplexity", "acc", "pass@1"
    higher_is_better: bool
    examples: int  # documents / questions / problems scored
    params: dict = field(default_factory=dict)  # the options the run used (limit, shots, seed, ...)
    systems: dict = field(default_factory=dict)  # see slimlm.eval.systems
    details: list[dict] = field(default_factory=list)  # per-example records (not stored in the registry)

    @property
    def score(self) -> float:
        return self.metrics[self.primary]

    def to_dict(self, details: bool = False) -> dict:
        out = asdict(self)
        if not details:
            out.pop("details")
        return out

    def registry_metrics(self) -> dict:
        """The `metrics` column of the run registry for command 'eval'."""
        return {"task": self.task, "kind": self.kind, "quality": self.metrics, "primary": self.primary,
                "higher_is_better": self.higher_is_better, "examples": self.examples, "systems": self.systems}
