"""Perplexity and fidelity, checked against independent computations: transformers' own loss
on the same windows, a direct KL formula, and (on the GGUF path) llama.cpp's logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slimlm.data import python_docs
from slimlm.eval.loglik import TorchScorer
from slimlm.eval.perplexity import run_perplexity, sliding_windows
from slimlm.models.backends import open_backend

DOCS = python_docs()[:3]


@pytest.mark.parametrize("n,context,stride", [(1, 4, 4), (10, 4, 4), (37, 8, 3), (37, 8, 8), (5, 64, 16), (30, 2, 1)])
def test_windows_score_every_token_once_within_context(n, context, stride):
    doc = list(range(100, 100 + n))
    windows = sliding_windows(doc, prefix_id=7, context=context, stride=stride)
    scored = [tok for w in windows for tok in w.ids[w.start:]]
    assert scored == doc
    assert all(len(w.ids) <= context and w.start >= 1 for w in windows)
    # every window starts where the full sequence has those tokens
    full = [7, *doc]
    for w in windows:
        i = full.index(w.ids[0]) if w.ids[0] != 7 else 0
        assert full[i:i + len(w.ids)] == w.ids


def _transformers_nll(model, windows):
    """Sum of token NLLs from transformers' own loss (labels = -100 where not scored)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w.ids])
            labels = ids.clone()
            labels[0, :w.start] = -100
            n = len(w.ids) - w.start
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total, count


@pytest.mark.parametrize("context,stride,batch", [(64, 64, 1), (64, 16, 1), (48, 20, 3)])
def test_perplexity_matches_transformers_loss(tiny_models, context, stride, batch):
    engine = open_backend(str(tiny_models("llama")), "torch", dtype="float32")
    scorer = TorchScorer(engine, batch_size=batch)
    result = run_perplexity(scorer, DOCS, source="test", context=context, stride=stride)
    windows = [w for d in DOCS for w in sliding_windows(scorer.encode(d), scorer.prefix_id, context, stride)]
    nll, count = _transformers_nll(engine.model, windows)
    assert result.metrics["tokens"] == count == sum(len(scorer.encode(d)) for d in DOCS)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    assert result.metrics["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)


def test_eval_scores_in_fp32_unless_asked(tiny_models, capfd):
    """A log-likelihood score does not change with the CPU: `slimlm eval` scores in fp32 by default
    (where `auto` would pick bf16 on a CPU with native bf16), prints and records the precision,
    and runs bf16 only when asked."""
    from slimlm.errors import SlimlmError
    from slimlm.eval import evaluate
    from slimlm.runs import list_runs
    from tests.conftest import run_cli

    folder = str(tiny_models("llama"))
    options = {"limit": 1, "context": 64, "systems": False, "record": False}
    default = evaluate(folder, "perplexity:python-docs", **options)
    assert default.params["precision"].startswith("fp32")
    direct = run_perplexity(TorchScorer(open_backend(folder, "torch", dtype="float32")), python_docs()[:1],
                            source="t", context=64)
    assert default.metrics["perplexity"] == direct.metrics["perplexity"]
    asked = evaluate(folder, "perplexity:python-docs", dtype="bf16", **options)
    assert asked.params["precision"].startswith("bf16")
    with pytest.raises(SlimlmError, match="--dtype must be one of auto, fp32, bf16"):
        evaluate(folder, "perplexity:python-docs", dtype="fp16", **options)

    code, out, _ = run_cli(capfd, "eval", folder, "--task", "perplexity:python-docs", "--limit", "1", "--context", "64",
                           "--no-systems")
    assert code == 0 and "precision" in out and "fp32" in out
    assert list_runs(limit=1)[0].params["precision"].startswith("fp32")


def test_fidelity_is_zero_against_itself_and_matches_direct_kl(tiny_models, tiny_tokenizer_dir, tmp_path):
    import torch

    from tests.conftest import build_tiny_model

    model = open_backend(str(tiny_models("llama")), "torch", dtype="float32")
    other_dir = build_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "other", seed=1)
    other = open_backend(str(other_dir), "torch", dtype="float32")
    docs = DOCS[:1]
    same = run_perplexity(TorchScorer(model), docs, source="t", context=32, reference=TorchScorer(model))
    assert same.metrics["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert same.metrics["top1_agreement"] == 1.0

    result = run_perplexity(TorchScorer(model), docs, source="t", context=32, reference=TorchScorer(other))
    # direct: KL(P_ref || P_model) with torch's kl_div over the same windows
    scorer = TorchScorer(model)
    kls, agree = [], []
    with torch.no_grad():
        for w in sliding_windows(scorer.encode(docs[0]), scorer.prefix_id, 32, 32):
            ids = torch.tensor([w.ids])
            lp = torch.log_softmax(model.model(ids).logits[0, w.start - 1:-1], -1)
            lq = torch.log_softmax(other.model(ids).logits[0, w.start - 1:-1], -1)
            kls.append(torch.nn.functional.kl_div(lp, lq, log_target=True, reduction="none").sum(-1))
            agree.append(lp.argmax(-1) == lq.argmax(-1))
    kl = torch.cat(kls).numpy()
    assert result.metrics["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert result.metrics["kl_p99"] == pytest.approx(float(np.percentile(kl, 99)), rel=1e-4)
    assert result.metrics["top1_agreement"] == pytest.approx(float(torch.cat(agree).float().mean()))
    assert result.metrics["kl_mean"] > 0.01


def test_fidelity_refuses_a_different_tokenizer(tiny_models, smollm2_dense):
    from slimlm.errors import SlimlmError

    tiny = TorchScorer(open_backend(str(tiny_models("llama")), "torch"))
    real = TorchScorer(open_backend(str(smollm2_dense), "torch"))
    with pytest.raises(SlimlmError, match="tokenize the text differently"):
        run_perplexity(tiny, DOCS[:1], source="t", context=32, reference=real)


def test_bad_window_settings(tiny_models):
    from slimlm.errors import SlimlmError

    scorer = TorchScorer(open_backend(str(tiny_models("llama")), "torch"))
    for kwargs in ({"context": 1}, {"context": 16, "stride": 0}, {"context": 10**7}, {"context": 16, "limit": 0}):
        with pytest.raises(SlimlmError):
            run_perplexity(scorer, DOCS, source="t", **kwargs)


@pytest.mark.real_model
@pytest.mark.llamacpp
def test_gguf_perplexity_agrees_with_llama_cpp_logits(smollm2_gguf):
    """slimlm on llama.cpp vs numpy over llama.cpp's raw logits, and torch vs llama.cpp: within 1%."""
    from llama_cpp import Llama

    from slimlm.eval import evaluate

    docs = python_docs()[:2]
    context = 256
    via_llama = evaluate(str(smollm2_gguf), "perplexity:python-docs", backend="llamacpp", limit=2,
                         context=context, systems=False, record=False)
    via_torch = evaluate(str(smollm2_gguf), "perplexity:python-docs", backend="torch", limit=2,
                         context=context, systems=False, record=False)
    llm = Llama(model_path=str(smollm2_gguf), n_ctx=context, logits_all=True, verbose=False, n_gpu_layers=0)
    nll, count = 0.0, 0
    prefix = llm._model.token_bos()
    for doc in docs:
        ids = llm.tokenize(doc.encode(), add_bos=False, special=False)
        for w in sliding_windows(ids, prefix, context, context):
            llm.reset()
            llm.eval(w.ids)
            logits = np.array(llm.scores[w.start - 1:len(w.ids) - 1], dtype=np.float64)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            nll -= float((logits[np.arange(len(logits)), w.ids[w.start:]] - logz).sum())
            count += len(w.ids) - w.start
    llm.close()
    direct = math.exp(nll / count)
    assert via_llama.metrics["tokens"] == count
    assert via_llama.metrics["perplexity"] == pytest.approx(direct, rel=1e-3)
    assert via_torch.metrics["perplexity"] == pytest.approx(direct, rel=0.01)
