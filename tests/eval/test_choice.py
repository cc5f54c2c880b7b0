"""Multiple choice and classification by log-likelihood.

The forced case: a model whose output layer is zero predicts every token with probability 1/V,
so a choice's log-likelihood is exactly -(its token count) * log V. That fixes which answer must
win under `acc` (fewest tokens) and under `acc_norm` (per character), independently of slimlm.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from slimlm.eval.choice import continuation_request, run_choice
from slimlm.eval.loglik import Request, TorchScorer
from slimlm.eval.prompts import load_examples
from slimlm.eval.tasks import TaskSpec
from slimlm.models.backends import open_backend

SHORT, LONG = "zq", "is the class"


@pytest.fixture(scope="module")
def uniform_model(tiny_models, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_models("llama")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    out = tmp_path_factory.mktemp("uniform")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _token_count(tokenizer, context, continuation):
    return len(tokenizer(context + continuation)["input_ids"]) - len(tokenizer(context)["input_ids"])


def test_forced_multiple_choice(uniform_model, tmp_path):
    rows = [{"question": f"q{i}", "choices": [LONG, SHORT] if i % 2 else [SHORT, LONG], "answer": i % 2}
            for i in range(4)]
    spec = TaskSpec(name="forced", kind="multiple_choice", data=_write(tmp_path, "mc.jsonl", rows))
    engine = open_backend(str(uniform_model), "torch", dtype="float32")
    scorer = TorchScorer(engine)
    result = run_choice(scorer, engine, spec, load_examples(spec))
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    context = "Question: q0\nAnswer:"
    n_short, n_long = (_token_count(engine.tokenizer, context, " " + c) for c in (SHORT, LONG))
    assert n_short < n_long
    assert result.metrics["acc"] == 1.0  # the answer is always the choice with fewer tokens
    first = result.details[0]["loglik"]
    assert first == pytest.approx([-n_short * math.log(vocab), -n_long * math.log(vocab)], abs=1e-3)
    # acc_norm divides by characters: the long choice wins when it has fewer tokens per character
    assert n_long / len(LONG) != n_short / len(SHORT)  # no tie, so the expected winner is unique
    long_wins = n_long / len(LONG) < n_short / len(SHORT)
    assert result.metrics["acc_norm"] == (0.0 if long_wins else 1.0)

    wrong = [dict(r, answer=1 - r["answer"]) for r in rows]
    spec_wrong = TaskSpec(name="forced", kind="multiple_choice", data=_write(tmp_path, "w.jsonl", wrong))
    assert run_choice(scorer, engine, spec_wrong, load_examples(spec_wrong)).metrics["acc"] == 0.0


def test_forced_classification_macro_f1(uniform_model, tmp_path):
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate(["yes", "yes", "yes", LONG])]
    spec = TaskSpec(name="cls", kind="classification", data=_write(tmp_path, "c.jsonl", rows), labels=["yes", LONG])
    engine = open_backend(str(uniform_model), "torch", dtype="float32")
    result = run_choice(TorchScorer(engine), engine, spec, load_examples(spec))
    # Always predicts "yes": precision 3/4, recall 1 for yes; the other class never predicted.
    f1_yes = 2 * 0.75 * 1.0 / 1.75
    assert result.metrics["acc"] == 0.75
    assert result.metrics["macro_f1"] == pytest.approx((f1_yes + 0.0) / 2)


def test_loglik_matches_a_direct_forward_and_batching_changes_nothing(tiny_models):
    import torch

    engine = open_backend(str(tiny_models("llama")), "torch", dtype="float32")
    texts = [("The answer is", " yes"), ("Question: what is a list?\nAnswer:", " a sequence"), ("x", " y z w")]
    one, three = TorchScorer(engine, batch_size=1), TorchScorer(engine, batch_size=3)
    requests = [continuation_request(one, c, t) for c, t in texts]
    single, batched = one.score(requests), three.score(requests)
    for r, s, b in zip(requests, single, batched):
        with torch.no_grad():
            logits = engine.model(torch.tensor([r.ids])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        direct = [float(lp[i - 1, r.ids[i]]) for i in range(r.start, len(r.ids))]
        assert s.logprobs == pytest.approx(direct, abs=1e-4)
        assert b.logprobs == pytest.approx(s.logprobs, abs=1e-4)


def test_empty_choice_is_an_error(tiny_models):
    from slimlm.errors import SlimlmError

    scorer = TorchScorer(open_backend(str(tiny_models("llama")), "torch"))
    with pytest.raises(SlimlmError, match="empty"):
        continuation_request(scorer, "Question:", "")


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_llama_cpp_prefix_reuse_gives_the_same_logliks(smollm2_gguf):
    from slimlm.eval.loglik import LlamaCppScorer

    engine = open_backend(str(smollm2_gguf), "llamacpp", logits_all=True, n_ctx=512)
    scorer = LlamaCppScorer(engine)
    context = scorer.encode("Question: What is the capital of France?\nAnswer:")
    requests = [Request(context + scorer.encode(c), len(context)) for c in (" Paris", " Lyon", " Paris is nice")]
    reused = scorer.score(requests)  # the 2nd and 3rd reuse the cached context
    fresh = []
    for r in requests:
        engine.llm.reset()
        fresh += scorer.score([r])
    for a, b in zip(reused, fresh):
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-3)
    assert reused[0].logprobs.sum() > reused[1].logprobs.sum()  # Paris beats Lyon
    engine.close()


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_a_backend_that_cannot_give_logliks_is_refused(smollm2_gguf):
    from slimlm.errors import BackendUnavailable
    from slimlm.eval.loglik import LlamaCppScorer

    engine = open_backend(str(smollm2_gguf), "llamacpp", n_ctx=256)  # opened for generation only
    with pytest.raises(BackendUnavailable, match="logits"):
        LlamaCppScorer(engine)  # engine.scorer() opens a second handle with the logits instead
    engine.close()
