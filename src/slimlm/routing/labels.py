"""Training labels for the learned router: answer each prompt with both models and score them.

A prompt is labelled 1 when the small model's answer is good enough (as good as the large one's
against a reference, or close to the large one's when there is none). The small model's
answer log-probs are kept too, so `slimlm router eval` can draw the cascade policies' curves
on the same rows without generating again.

routing/ sits below serve/ in the layers, so the OpenAI-compatible client for a large model
behind a URL (serve.upstream.Upstream) is handed in by the caller as `remote_client`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from slimlm.errors import SlimlmError


@dataclass
class LabelSet:
    """Per prompt: both answers, their quality, and the label (1: the small one is good enough)."""

    prompts: list[str]
    labels: list[int] = field(default_factory=list)
    small_quality: list[float] = field(default_factory=list)
    large_quality: list[float] = field(default_factory=list)
    small_answers: list[str] = field(default_factory=list)
    large_answers: list[str] = field(default_factory=list)


def build_labels(prompts: Sequence[str], references: Sequence[str | list[str] | None] | None,
                 small_answer_fn: Callable[[str], str], large_answer_fn: Callable[[str], str],
                 scorer: Callable[[str, str], float] | str = "token_f1", margin: float = 0.0,
                 agreement: float = 0.5) -> LabelSet:
    """Answer every prompt with both models and label it.

    With a reference, both answers are scored against it (best of several references) and the
    small model is good enough when it scores at least the large one's score minus `margin`:
    where both fail, sending the prompt up would buy nothing. Without a reference the large
    answer stands in for one (its quality counts as 1) and the label is whether the small
    answer agrees with it to at least `agreement`.
    """
    from slimlm.eval.scorers import best_score, get_scorer

    score = get_scorer(scorer) if isinstance(scorer, str) else scorer
    references = list(references) if references is not None else [None] * len(prompts)
    if len(references) != len(prompts):
        raise SlimlmError(f"{len(prompts)} prompts but {len(references)} references: give one per prompt (or None)")
    out = LabelSet(prompts=list(prompts))
    for prompt, ref in zip(prompts, references):
        small, large = small_answer_fn(prompt), large_answer_fn(prompt)
        refs = [r for r in ([ref] if isinstance(ref, str) else ref or []) if r and r.strip()]
        if refs:
            sq, lq = best_score(score, small, refs), best_score(score, large, refs)
            label = sq >= lq - margin
        else:
            sq, lq = score(small, large), 1.0
            label = sq >= agreement
        out.labels.append(int(label))
        out.small_quality.append(float(sq))
        out.large_quality.append(float(lq))
        out.small_answers.append(small)
        out.large_answers.append(large)
    return out


def answer_logprobs(engine, prompt: str, answer: str, top: int = 5):
    """The local answer's token log-probs (and the top-k at each step) by one teacher-forced
    forward pass of the backend's scorer, for the cascade policy; None when it cannot score."""
    if not engine.supports("score"):
        return None, None
    from slimlm.models.backends.scoring import Request

    scorer = engine.scorer()
    prompt_ids = engine.tokenize(engine.prompt_text(prompt))
    answer_ids = scorer.encode(answer) if answer else []
    if not answer_ids:
        return [], []
    scored = scorer.score([Request(prompt_ids + answer_ids, len(prompt_ids))], want_rows=True)[0]
    rows = scored.rows
    return scored.logprobs.tolist(), rows.topk(min(top, rows.shape[-1]), dim=-1).values.tolist()


def answerers(small: str, large: str, large_model: str | None = None, api_key_env: str | None = None,
              max_tokens: int = 64, remote_client: Callable | None = None):
    """(small engine, small answer fn, large answer fn, close fn). `large` is a local model, or
    the URL of an OpenAI-compatible API asked through `remote_client(url, api_key_env=...)`, an
    object with `async chat(body)` and `async aclose()`. Answers are greedy."""
    from slimlm.models.backends import GenerationParams, open_backend

    params = GenerationParams(max_tokens=max_tokens, temperature=0.0).validate()
    engine = open_backend(small)

    def local(e):
        return lambda prompt: e.generate(prompt, params).text

    if not large.startswith(("http://", "https://")):
        large_engine = engine if large == small else open_backend(large)
        return engine, local(engine), local(large_engine), lambda: None
    import asyncio

    if not large_model:
        raise SlimlmError("--large is a URL: name the model to ask for with --large-model")
    if remote_client is None:
        raise SlimlmError("--large is a URL, but no client for it was given")
    loop = asyncio.new_event_loop()
    upstream = remote_client(large, api_key_env=api_key_env)

    def remote(prompt: str) -> str:
        body = {"model": large_model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0}
        answer = loop.run_until_complete(upstream.chat(body))
        return (answer.get("choices") or [{}])[0].get("message", {}).get("content") or ""

    def close():
        loop.run_until_complete(upstream.aclose())
        loop.close()

    return engine, local(engine), remote, close


def label_rows(rows: list[dict], small: str, large: str, large_model: str | None = None,
               api_key_env: str | None = None, scorer: str = "token_f1", max_tokens: int = 64,
               remote_client: Callable | None = None) -> list[dict]:
    """Answer each row with both models and add answers, qualities, label and log-probs."""
    engine, small_fn, large_fn, close = answerers(small, large, large_model, api_key_env, max_tokens, remote_client)
    try:
        refs = [r.get("references", r.get("reference")) for r in rows]
        labels = build_labels([r["prompt"] for r in rows], refs, small_fn, large_fn, scorer)
    finally:
        close()
    labelled = []
    for i, row in enumerate(rows):
        lps, top = answer_logprobs(engine, row["prompt"], labels.small_answers[i])
        labelled.append({**row, "small_answer": labels.small_answers[i], "large_answer": labels.large_answers[i],
                         "small_quality": labels.small_quality[i], "large_quality": labels.large_quality[i],
                         "label": labels.labels[i], "small_logprobs": lps, "small_top_logprobs": top})
    return labelled
