"""Shared backend behaviour (stop strings, chat rendering, chat sessions), the registry, the
interface a consumer uses (context, vocabulary, token bytes, scoring, capabilities) on the torch
backend, and the precision plan. The llama.cpp side of the interface is in test_llamacpp.py."""

from __future__ import annotations

import warnings

import pytest

from slimlm.chat import ChatSession
from slimlm.errors import BackendUnavailable, SlimlmError
from slimlm.hardware import cpu_info, llama_cpp_build_problem
from slimlm.models.backends import BACKENDS, GenerationParams, backend_help, open_backend, pick_backend
from slimlm.models.backends.base import Backend
from slimlm.models.backends.precision import choose_precision
from slimlm.models.reference import resolve


class ScriptedBackend(Backend):
    """A backend whose model always says the same pieces: the dependency, not the thing tested."""

    name = "scripted"

    def __init__(self, pieces):
        super().__init__()
        self.pieces = pieces

    chat_template = "x"

    def render_chat(self, messages):
        return " | ".join(m["content"] for m in messages)

    def tokenize(self, text):
        return text.split()

    def _stream_tokens(self, prompt_ids, params):
        for piece in self.pieces[: params.max_tokens]:
            self._generated += 1
            yield piece


def test_stop_string_split_across_pieces_is_cut():
    backend = ScriptedBackend(["The answer", " is 4", "2.\nQ", "uestion: next"])
    done = backend.generate("q", GenerationParams(max_tokens=10, stop=["\nQuestion:"]))
    assert done.text == "The answer is 42."
    assert done.timings.finish_reason == "stop"


def test_no_stop_keeps_everything_and_counts_tokens():
    backend = ScriptedBackend(["a", "b", "c"])
    done = backend.generate("q", GenerationParams(max_tokens=2))
    assert done.text == "ab" and done.timings.generated_tokens == 2 and done.timings.finish_reason == "length"


def test_params_are_validated():
    with pytest.raises(SlimlmError, match="max-tokens"):
        GenerationParams(max_tokens=0).validate()
    with pytest.raises(SlimlmError, match="temperature"):
        GenerationParams(temperature=-1).validate()


def test_chat_session_keeps_turns_and_resets(tiny_models):
    engine = open_backend(tiny_models("llama"), "torch", dtype="float32")
    session = ChatSession(engine, GenerationParams(max_tokens=4), system="Be brief.")
    "".join(session.handle("first question"))
    "".join(session.handle("second question"))
    roles = [m["role"] for m in session.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert "".join(session.handle("/reset")) == "(conversation reset)"
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    assert session.handle("/exit") is None


def test_torch_chat_prompt_is_the_template(tiny_models):
    engine = open_backend(tiny_models("qwen2"), "torch", dtype="float32")
    text = engine.prompt_text("hello")
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert engine.prompt_text("hello", raw=True) == "hello"


def test_seeded_sampling_is_repeatable_on_torch(tiny_models):
    engine = open_backend(tiny_models("llama"), "torch", dtype="float32")
    params = GenerationParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert engine.generate("abc", params, raw=True).text == engine.generate("abc", params, raw=True).text


def test_auto_backend_choice(tiny_models, smollm2_gguf):
    assert pick_backend(resolve(str(tiny_models("llama")))) == "torch"
    expected = "llamacpp" if llama_cpp_build_problem() is None else "torch"
    assert pick_backend(resolve(str(smollm2_gguf))) == expected
    with pytest.raises(SlimlmError, match="GGUF"):
        open_backend(tiny_models("llama"), "llamacpp")


def test_the_registry_dispatches_and_names_the_choices(tiny_models):
    from slimlm.models.backends.llamacpp import LlamaCppBackend
    from slimlm.models.backends.torch_backend import TorchBackend

    assert BACKENDS == {"torch": TorchBackend, "llamacpp": LlamaCppBackend}
    assert backend_help().endswith("torch, or llamacpp.")
    with pytest.raises(SlimlmError, match="choose one of auto, torch, llamacpp"):
        pick_backend(resolve(str(tiny_models("llama"))), "onnx")
    ref = resolve(str(tiny_models("llama")))
    engine = open_backend(ref, dtype="float32")  # a resolved reference is used as it is
    assert type(engine) is TorchBackend and engine.ref is ref and engine.label == "torch"


def test_a_backend_without_optional_parts_says_so():
    backend = ScriptedBackend(["a"])
    assert not any(backend.supports(c) for c in ("score", "adapters", "batch", "dtype"))
    assert not backend.uses_accelerator() and backend.ref is None
    for call in (backend.scorer, lambda: backend.token_bytes(1), lambda: backend.context_length,
                 lambda: backend.generate_batch([[1]], 2)):
        with pytest.raises(BackendUnavailable):
            call()
    with pytest.raises(SlimlmError, match="torch backend"):
        backend.apply_adapters({"a": "x"})


def test_torch_interface_matches_transformers(tiny_models):
    """What a consumer asks of the torch backend, against the model's own config and a direct
    transformers forward pass."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimlm.models.backends.scoring import Request

    folder = tiny_models("llama")
    config = AutoConfig.from_pretrained(folder)
    engine = open_backend(folder, "torch", dtype="float32")
    assert engine.context_length == config.max_position_embeddings and engine.vocab_size == config.vocab_size
    assert open_backend(folder, "torch", dtype="float32", n_ctx=100).context_length == 100  # serve --n-ctx caps it
    assert all(engine.supports(c) for c in ("score", "adapters", "batch", "dtype")) and not engine.supports("x")
    assert engine.describe() == engine.plan.describe() and engine.uses_accelerator() == (engine.device != "cpu")

    text = "print('naïve → café')\n"  # multi-byte characters split across byte-level tokens
    ids = engine.tokenize(text)
    assert b"".join(engine.token_bytes(t) for t in ids) == text.encode()
    assert engine.token_text(ids[0]) == engine.token_bytes(ids[0]).decode("utf-8", errors="replace")

    ids = engine.tokenize("def add(a, b):\n    return a + b")
    scored = engine.scorer().score([Request(ids, 1)], want_rows=True)[0]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        direct = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    expected = [float(direct[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert scored.logprobs == pytest.approx(expected, abs=1e-4)
    assert scored.rows.shape == (len(ids) - 1, engine.vocab_size)


def test_torch_batch_generation_answers_like_the_decode_loop(tiny_models):
    engine = open_backend(tiny_models("llama"), "torch", dtype="float32")
    engine.stop_ids = set()  # compare all tokens, even if one is an end token
    params = GenerationParams(max_tokens=6)
    [(text, stopped)] = engine.generate_batch([engine.tokenize("The function")], 6)
    assert text == engine.generate("The function", params, raw=True).text and not stopped
    assert len(engine.generate_batch([engine.tokenize("a"), engine.tokenize("longer prompt here")], 3)) == 2


def test_decode_loop_passes_the_cache_by_its_current_name(tiny_models, monkeypatch):
    """transformers 5.x warns on forward's old `past_key_values` keyword; slimlm passes `cache`,
    and the text is the same as through the old name."""
    import slimlm.models.backends.torch_backend as tb

    engine = open_backend(tiny_models("llama"), "torch")
    params = GenerationParams(max_tokens=8)

    def run() -> tuple[str, list[str]]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            text = engine.generate("def f(x):", params, raw=True).text
        return text, [str(w.message) for w in seen if "past_key_values" in str(w.message)]

    text, warned = run()
    assert warned == [] and text
    monkeypatch.setattr(tb, "cache_keyword", lambda model: "past_key_values")
    old_text, old_warned = run()
    assert old_text == text and old_warned  # the old name still works, and warns


def test_llama_cpp_build_for_another_cpu_is_refused(monkeypatch):
    import slimlm.hardware as hw

    monkeypatch.setattr(hw, "llama_cpp_build", lambda: {"variant": "native", "cpu_model": "Some Other CPU 9000",
                                                        "cpu_signature": "0123456789abcdef"})
    problem = hw.llama_cpp_build_problem()
    assert "another CPU" in problem and "make llama-cpp" in problem


def test_precision_plan_follows_the_cpu():
    import torch

    plan = choose_precision("cpu")
    if cpu_info().native_bf16:
        assert plan.prefill == plan.decode == torch.bfloat16
    else:
        assert plan.prefill == torch.float32 and plan.decode in (torch.float32, torch.bfloat16)
    assert choose_precision("cpu", "float16").decode == torch.float16
    with pytest.raises(SlimlmError, match="unknown dtype"):
        choose_precision("cpu", "int3")


@pytest.mark.real_model
def test_split_precision_decode_tracks_fp32(smollm2_dense):
    """The bf16 decode copy (with the fp32 prefill cache cast to bf16) picks fp32's next token
    almost always on real text: the speed trick must not change what the model says."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from slimlm.models.backends.torch_cache import cast_cache

    tok = AutoTokenizer.from_pretrained(smollm2_dense)
    ids = tok("Python is an interpreted, high-level, general-purpose programming language. Its design "
              "philosophy emphasizes code readability with the use of significant indentation.")["input_ids"]
    fp32 = AutoModelForCausalLM.from_pretrained(smollm2_dense, dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(smollm2_dense, dtype=torch.bfloat16).eval()
    split = 8
    with torch.inference_mode():
        reference = fp32(torch.tensor([ids])).logits[0, split:].argmax(-1)
        cache = DynamicCache(config=fp32.config)
        fp32(torch.tensor([ids[:split]]), cache=cache)
        cast_cache(cache, torch.bfloat16)
        picks = []
        for t in ids[split:]:
            picks.append(int(bf16(torch.tensor([[t]]), cache=cache).logits[0, -1].argmax()))
    agree = (torch.tensor(picks) == reference).float().mean().item()
    assert agree > 0.9
