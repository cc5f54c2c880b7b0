"""The llama.cpp backend against raw llama-cpp-python and torch: the consumer interface on a
tiny GGUF exported from a random model, and generation on the real built-in model."""

from __future__ import annotations

import llama_cpp  # a required dependency: its absence fails these tests, never skips them
import numpy as np
import pytest

from slimlm.models.backends import GenerationParams, open_backend

pytestmark = [pytest.mark.llamacpp]
TEXT = ("The Python language reference describes the exact syntax and semantics of the language. "
        "It is terse, but attempts to be exact and complete. ") * 6


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_interface_matches_llama_cpp(tiny_gguf, tiny_models):
    from transformers import AutoConfig

    from slimlm.errors import SlimlmError

    engine = open_backend(str(tiny_gguf), "llamacpp", n_ctx=256)
    raw = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, verbose=False)
    assert engine.label == "llamacpp" and engine.context_length == raw.n_ctx() == 256
    assert engine.vocab_size == raw.n_vocab() == AutoConfig.from_pretrained(tiny_models("llama")).vocab_size
    assert engine.supports("score") and not any(engine.supports(c) for c in ("adapters", "batch", "dtype"))
    text = "print('naïve → café')\n"  # multi-byte characters split across byte-level tokens
    ids = raw.tokenize(text.encode(), add_bos=False, special=False)
    assert b"".join(engine.token_bytes(t) for t in ids) == text.encode()
    with pytest.raises(SlimlmError, match="opens LoRA files per model"):
        engine.apply_adapters({"a": "x"})
    params = GenerationParams(max_tokens=6)
    from_text = list(engine.stream("def f(x):", params, raw=True))
    text_timings = engine.last_timings
    assert list(engine.stream_ids(engine.tokenize("def f(x):"), params)) == from_text
    assert engine.last_timings.generated_tokens == text_timings.generated_tokens
    engine.close()
    raw.close()


def test_scorer_opens_its_own_handle_and_matches_transformers(tiny_gguf, tiny_models):
    """A handle opened for generation scores through a second, logits_all handle (opened on the
    first call): the numbers of a direct transformers forward on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from slimlm.errors import BackendUnavailable
    from slimlm.models.backends.llamacpp_scoring import LlamaCppScorer
    from slimlm.models.backends.scoring import Request

    engine = open_backend(str(tiny_gguf), "llamacpp", n_ctx=256)
    scorer = engine.scorer()
    assert scorer.llm is not engine.llm and engine.scorer().llm is scorer.llm  # opened once
    ids = [scorer.prefix_id] + scorer.encode("def add(a, b):\n    return a + b")
    got = scorer.score([Request(ids, 1)], want_rows=True)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        direct = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    expected = [float(direct[i - 1, ids[i]]) for i in range(1, len(ids))]
    np.testing.assert_allclose(got.logprobs, expected, rtol=2e-3, atol=2e-3)  # llama.cpp's KV cache is f16
    assert got.rows.shape == (len(ids) - 1, engine.vocab_size)
    with pytest.raises(BackendUnavailable, match="logits"):  # the scorer itself refuses a handle without them
        LlamaCppScorer(engine)
    engine.close()
    opened = open_backend(str(tiny_gguf), "llamacpp", logits_all=True, n_ctx=256)
    assert opened.scorer().llm is opened.llm  # opened for scoring: no second handle
    np.testing.assert_allclose(opened.scorer().score([Request(ids, 1)])[0].logprobs, got.logprobs, atol=1e-5)
    opened.close()


def _logits(path, n_batch):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=n_batch, n_ubatch=n_batch, logits_all=True,
                          verbose=False)
    toks = llm.tokenize(TEXT.encode())[:160]
    llm.eval(toks)
    return np.array(llm.scores[: len(toks)])


@pytest.mark.real_model
def test_prompt_batching_matches_token_by_token(smollm2_gguf):
    """A crashing or wrong batched prompt evaluation (seen with AMX builds) fails here."""
    batched, single = _logits(smollm2_gguf, 512), _logits(smollm2_gguf, 1)
    assert (batched.argmax(-1) == single.argmax(-1)).mean() > 0.97
    # Batched kernels round differently (seen here: mean KL 0.001); a broken build is far off.
    kl = (np.exp(_log_softmax(single)) * (_log_softmax(single) - _log_softmax(batched))).sum(-1)
    assert kl.mean() < 0.01


@pytest.mark.real_model
def test_greedy_output_equals_raw_llama_cpp(smollm2_gguf):
    engine = open_backend(str(smollm2_gguf), "llamacpp")
    prompt = "def fibonacci(n):"
    ours = engine.generate(prompt, GenerationParams(max_tokens=24), raw=True)
    raw = llama_cpp.Llama(model_path=str(smollm2_gguf), n_ctx=4096, verbose=False)
    theirs = raw.create_completion(prompt, max_tokens=24, temperature=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0)
    assert ours.text == theirs["choices"][0]["text"]
    assert ours.timings.generated_tokens == theirs["usage"]["completion_tokens"]
    assert ours.timings.prompt_tokens == theirs["usage"]["prompt_tokens"]


@pytest.mark.real_model
def test_chat_template_renders_like_transformers(smollm2_gguf, smollm2_dense):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a prime."}]
    engine = open_backend(str(smollm2_gguf), "llamacpp")
    tok = AutoTokenizer.from_pretrained(smollm2_dense)
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert engine.render_chat(messages) == expected
    assert engine.tokenize(expected) == tok(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.real_model
def test_seeded_sampling_repeats_and_stop_strings_cut(smollm2_gguf):
    engine = open_backend(str(smollm2_gguf), "llamacpp")
    params = GenerationParams(max_tokens=20, temperature=0.9, seed=7)
    first = engine.generate("Write a short poem about the sea.", params).text
    assert engine.generate("Write a short poem about the sea.", params).text == first
    cut = engine.generate("Count from 1 to 10, separated by commas.", GenerationParams(max_tokens=40, stop=["5"]))
    assert "5" not in cut.text and cut.timings.finish_reason == "stop"


@pytest.mark.real_model
def test_torch_and_llamacpp_agree_on_next_tokens(smollm2_gguf, smollm2_dense):
    """Same weights, two engines: next-token choices on real text mostly agree (Q4_1 vs dense)."""
    import torch
    from transformers import AutoModelForCausalLM

    llm = llama_cpp.Llama(model_path=str(smollm2_gguf), n_ctx=512, logits_all=True, verbose=False)
    toks = llm.tokenize(TEXT.encode())[:160]
    llm.eval(toks)
    a = np.array(llm.scores[: len(toks)])
    model = AutoModelForCausalLM.from_pretrained(smollm2_dense, dtype=torch.float32).eval()
    with torch.inference_mode():
        b = model(torch.tensor([toks])).logits[0].numpy()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9
