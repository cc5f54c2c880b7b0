"""The llama.cpp backend on the real built-in model, against raw llama-cpp-python and torch."""

from __future__ import annotations

import llama_cpp  # a required dependency: its absence fails these tests, never skips them
import numpy as np
import pytest

from slimlm.models.backends import GenerationParams, open_backend

pytestmark = [pytest.mark.real_model, pytest.mark.llamacpp]
TEXT = ("The Python language reference describes the exact syntax and semantics of the language. "
        "It is terse, but attempts to be exact and complete. ") * 6


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logits(path, n_batch):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=n_batch, n_ubatch=n_batch, logits_all=True,
                          verbose=False)
    toks = llm.tokenize(TEXT.encode())[:160]
    llm.eval(toks)
    return np.array(llm.scores[: len(toks)])


def test_prompt_batching_matches_token_by_token(smollm2_gguf):
    """A crashing or wrong batched prompt evaluation (seen with AMX builds) fails here."""
    batched, single = _logits(smollm2_gguf, 512), _logits(smollm2_gguf, 1)
    assert (batched.argmax(-1) == single.argmax(-1)).mean() > 0.97
    # Batched kernels round differently (seen here: mean KL 0.001); a broken build is far off.
    kl = (np.exp(_log_softmax(single)) * (_log_softmax(single) - _log_softmax(batched))).sum(-1)
    assert kl.mean() < 0.01


def test_greedy_output_equals_raw_llama_cpp(smollm2_gguf):
    engine = open_backend(str(smollm2_gguf), "llamacpp")
    prompt = "def fibonacci(n):"
    ours = engine.generate(prompt, GenerationParams(max_tokens=24), raw=True)
    raw = llama_cpp.Llama(model_path=str(smollm2_gguf), n_ctx=4096, verbose=False)
    theirs = raw.create_completion(prompt, max_tokens=24, temperature=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0)
    assert ours.text == theirs["choices"][0]["text"]
    assert ours.timings.generated_tokens == theirs["usage"]["completion_tokens"]
    assert ours.timings.prompt_tokens == theirs["usage"]["prompt_tokens"]


def test_chat_template_renders_like_transformers(smollm2_gguf, smollm2_dense):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a prime."}]
    engine = open_backend(str(smollm2_gguf), "llamacpp")
    tok = AutoTokenizer.from_pretrained(smollm2_dense)
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert engine.render_chat(messages) == expected
    assert engine.tokenize(expected) == tok(expected, add_special_tokens=False)["input_ids"]


def test_seeded_sampling_repeats_and_stop_strings_cut(smollm2_gguf):
    engine = open_backend(str(smollm2_gguf), "llamacpp")
    params = GenerationParams(max_tokens=20, temperature=0.9, seed=7)
    first = engine.generate("Write a short poem about the sea.", params).text
    assert engine.generate("Write a short poem about the sea.", params).text == first
    cut = engine.generate("Count from 1 to 10, separated by commas.", GenerationParams(max_tokens=40, stop=["5"]))
    assert "5" not in cut.text and cut.timings.finish_reason == "stop"


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
