"""Perplexity over a text source with a sliding window, and fidelity to a reference model.

Windowing: each document starts with the model's BOS (or EOS) token so that its first token is
scored too, and every token is scored exactly once. A window holds at most `context` tokens and
moves `stride` tokens at a time, so each scored token sees at least `context - stride` tokens
before it (the scheme of Hugging Face's perplexity guide, without the token that guide loses at
each window edge). stride == context gives non-overlapping windows: the fastest, least context.

Bits per byte divides the total negative log-likelihood (in bits) by the UTF-8 bytes of the text,
so models with different tokenizers compare; perplexity alone does not.

Fidelity (`reference=`) scores the same windows with a second model and reports the per-token
KL divergence KL(reference || model) and top-1 agreement, as llama.cpp's perplexity tool does for
quantized models: the way to judge a compressed or distilled copy without labels.
"""

from __future__ import annotations

import math

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.eval.kinds import EvalOptions, TaskKind, register_task_kind
from slimlm.eval.loglik import Request, Scorer
from slimlm.eval.result import EvalResult
from slimlm.progress import progress_bar


@register_task_kind("perplexity")
class Perplexity(TaskKind):
    help = "perplexity:SOURCE  perplexity and bits per byte over python-docs, a text file or a JSONL field"
    needs_loglik = True
    takes_reference = True

    def load(self, source: str, options: EvalOptions, report) -> list[str]:
        from slimlm.data import text_documents

        return text_documents(source, options.field, skip_bad_lines=options.skip_bad_lines, report=report)

    def run(self, source: str, docs: list[str], backend, options: EvalOptions) -> EvalResult:
        scorer = self.scorer(backend, options)
        if options.chat:
            raise SlimlmError("perplexity scores plain text: drop --chat")
        ref_scorer = ref_backend = None
        if options.reference:
            ref_backend = options.open_model(options.reference, options.reference_backend, self.name)
            ref_scorer = self.scorer(ref_backend, options)
        try:
            return run_perplexity(scorer, docs, source=source, context=options.context, stride=options.stride,
                                  limit=options.limit, reference=ref_scorer, reference_name=options.reference)
        finally:
            if ref_backend is not None:
                ref_backend.close()


def sliding_windows(doc_ids: list[int], prefix_id: int, context: int, stride: int) -> list[Request]:
    """Windows covering prefix + doc; each doc token is scored in exactly one window."""
    tokens = [prefix_id, *doc_ids]
    step = min(stride, context - 1)
    out, pos = [], 1
    while pos < len(tokens):
        end = min(pos + step, len(tokens))
        begin = max(0, end - context)
        out.append(Request(tokens[begin:end], pos - begin))
        pos = end
    return out


def _validate(context: int, stride: int, scorer: Scorer) -> None:
    if context < 2:
        raise SlimlmError(f"--context must be at least 2 tokens (got {context})")
    if stride < 1:
        raise SlimlmError(f"--stride must be at least 1 token (got {stride})")
    if context > scorer.max_length:
        raise SlimlmError(f"--context {context} is longer than the model's context ({scorer.max_length}): lower it")


def _kl_rows(ref_rows, rows) -> tuple[np.ndarray, np.ndarray]:
    """Per-token KL(reference || model) and top-1 agreement, from log-softmax rows."""

    kl = (ref_rows.exp() * (ref_rows - rows)).sum(-1).clamp_min(0)
    same = ref_rows.argmax(-1) == rows.argmax(-1)
    return kl.double().numpy(), same.numpy()


def run_perplexity(scorer: Scorer, docs: list[str], *, source: str, context: int = 2048,
                   stride: int | None = None, limit: int | None = None,
                   reference: Scorer | None = None, reference_name: str | None = None) -> EvalResult:
    stride = context if stride is None else stride
    _validate(context, stride, scorer)
    if limit is not None:
        if limit < 1:
            raise SlimlmError(f"--limit must be at least 1 (got {limit})")
        docs = docs[:limit]
    doc_ids = [scorer.encode(d) for d in docs]
    if reference is not None:
        _validate(context, stride, reference)
        if reference.vocab_size != scorer.vocab_size or reference.prefix_id != scorer.prefix_id or any(
                reference.encode(d) != ids for d, ids in zip(docs, doc_ids)):
            raise SlimlmError("the model and the reference tokenize the text differently: fidelity needs the "
                              "same tokenizer (e.g. a quantized or pruned copy of the reference)")
    windows, owner = [], []
    for d, ids in enumerate(doc_ids):
        for w in sliding_windows(ids, scorer.prefix_id, context, stride):
            windows.append(w)
            owner.append(d)
    doc_nll = [0.0] * len(docs)
    total_tokens = sum(len(w.ids) - w.start for w in windows)
    nll, greedy_hits = 0.0, 0
    kls, agree, ref_nll = [], 0, 0.0
    # Fidelity needs whole probability rows (vocab-sized per token), so it goes one window at a time.
    chunk = 1 if reference is not None else max(8, getattr(scorer, "batch_size", 1) * 4)
    with progress_bar(f"perplexity:{source}", total_tokens) as advance:
        for first in range(0, len(windows), chunk):
            part = windows[first:first + chunk]
            scored = scorer.score(part, want_rows=reference is not None)
            for k, s in enumerate(scored):
                nll -= float(s.logprobs.sum())
                doc_nll[owner[first + k]] -= float(s.logprobs.sum())
                greedy_hits += int(s.greedy.sum())
            if reference is not None:
                for s, r in zip(scored, reference.score(part, want_rows=True)):
                    kl, same = _kl_rows(r.rows, s.rows)
                    kls.append(kl)
                    agree += int(same.sum())
                    ref_nll -= float(r.logprobs.sum())
            advance(sum(len(w.ids) - w.start for w in part))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    metrics = {"perplexity": math.exp(nll / total_tokens), "nll": nll / total_tokens,
               "bits_per_byte": nll / math.log(2) / n_bytes, "tokens": total_tokens, "bytes": n_bytes,
               "top1_accuracy": greedy_hits / total_tokens}
    if reference is not None:
        all_kl = np.concatenate(kls)
        ref_ppl = math.exp(ref_nll / total_tokens)
        metrics.update({"kl_mean": float(all_kl.mean()), "kl_median": float(np.median(all_kl)),
                        "kl_p99": float(np.percentile(all_kl, 99)), "top1_agreement": agree / total_tokens,
                        "reference_perplexity": ref_ppl, "ppl_ratio": metrics["perplexity"] / ref_ppl})
    details = [{"index": d, "tokens": len(ids), "nll": doc_nll[d] / max(len(ids), 1),
                "perplexity": math.exp(doc_nll[d] / max(len(ids), 1))} for d, ids in enumerate(doc_ids)]
    return EvalResult(task=f"perplexity:{source}", kind="perplexity", model="", backend=scorer.name,
                      metrics=metrics, primary="perplexity", higher_is_better=False, examples=len(docs),
                      details=details,
                      params={"context": context, "stride": stride, "limit": limit, "windows": len(windows),
                              "reference": reference_name})
