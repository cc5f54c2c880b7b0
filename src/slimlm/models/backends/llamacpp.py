"""llama.cpp backend, through llama-cpp-python: the fast decoder for GGUF files on a CPU.

The hot loop is llama-cpp-python's own `create_completion` stream; slimlm adds only the chat
template rendering (from the GGUF's own metadata) and the shared stop/timing logic, so decode
speed stays that of raw llama.cpp (bench/generate.py checks the ratio).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

from slimlm.errors import BackendUnavailable, SlimlmError
from slimlm.hardware import default_threads, llama_cpp_build_problem
from slimlm.models.backends.base import Backend, GenerationParams, Messages
from slimlm.models.reference import ModelRef


def llama_kwargs(n_ctx: int | None = None, n_threads: int | None = None, n_batch: int = 512) -> dict:
    """Settings shared by slimlm's backend and the raw-llama.cpp peer in the benchmark."""
    return dict(n_ctx=n_ctx or 4096, n_threads=n_threads or default_threads(), n_batch=n_batch,
                n_ubatch=n_batch, verbose=False)


class LlamaCppBackend(Backend):
    name = "llamacpp"
    capabilities = frozenset({"score", "continuous"})

    @classmethod
    def prefers(cls, ref: ModelRef) -> bool:
        """`auto` picks llama.cpp for GGUF files: measured several times faster at decode on a CPU."""
        from slimlm import hardware

        return ref.kind == "gguf" and hardware.llama_cpp_build_problem() is None

    @classmethod
    def scoring_options(cls, context: int) -> dict:
        return {"logits_all": True, "n_ctx": context}

    def __init__(self, ref: ModelRef, n_ctx: int | None = None, threads: int | None = None,
                 n_gpu_layers: int | None = None, logits_all: bool = False) -> None:
        super().__init__()
        if ref.kind != "gguf":
            raise BackendUnavailable(f"the llama.cpp backend runs GGUF files; {ref.spec} is a Hugging Face folder: "
                                     "use --backend torch, or export it to GGUF first")
        problem = llama_cpp_build_problem()
        if problem:
            raise BackendUnavailable(problem)
        if n_gpu_layers is None:
            n_gpu_layers = -1 if os.environ.get("SLIMLM_GPU", "1") != "0" else 0
        self.ref, self.logits_all = ref, logits_all
        self._open_kwargs = dict(threads=threads, n_gpu_layers=n_gpu_layers)
        self.llm = self._open(n_ctx, logits_all)
        self._score_llm = None  # a second handle with every position's logits, opened by scorer()
        meta = self.llm.metadata
        self._template = meta.get("tokenizer.chat_template")
        self.bos_text = self._piece(self.llm.token_bos())
        self.eos_text = self._piece(self.llm.token_eos())

    def _open(self, n_ctx: int | None, logits_all: bool):
        from llama_cpp import Llama

        kwargs = llama_kwargs(n_ctx, self._open_kwargs["threads"])
        return Llama(model_path=str(self.ref.path), n_gpu_layers=self._open_kwargs["n_gpu_layers"],
                     logits_all=logits_all, **kwargs)

    def _piece(self, token: int) -> str:
        if token is None or token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

    @property
    def chat_template(self) -> str | None:
        return self._template

    @property
    def context_length(self) -> int:
        return self.llm.n_ctx()

    @property
    def vocab_size(self) -> int:
        return self.llm.n_vocab()

    def uses_accelerator(self) -> bool:
        """llama.cpp offloads layers when built with GPU support (and SLIMLM_GPU is not 0)."""
        import llama_cpp

        try:
            return bool(llama_cpp.llama_supports_gpu_offload()) and os.environ.get("SLIMLM_GPU", "1") != "0"
        except AttributeError:
            return False

    def token_bytes(self, token: int) -> bytes:
        return self.llm.detokenize([token], special=True)

    def precision(self) -> str:
        from gguf import LlamaFileType

        from slimlm.hardware import llama_cpp_build

        build = (llama_cpp_build() or {}).get("variant", "user")
        try:
            ftype = LlamaFileType(int(self.llm.metadata["general.file_type"])).name.removeprefix("MOSTLY_")
        except (KeyError, ValueError):
            ftype = "GGUF"
        return f"{ftype}, {build}"

    def render_chat(self, messages: Messages) -> str:
        return self._chat_formatter(messages=messages).prompt

    @functools.cached_property
    def _chat_formatter(self):
        """Built once: making one compiles the Jinja template, which measured ~4 ms a request on
        the server's event loop (a sixth of its CPU time at 16 streaming clients)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        return Jinja2ChatFormatter(template=self._template, eos_token=self.eos_text, bos_token=self.bos_text,
                                   add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        # A template that writes the BOS token itself must not get a second one.
        add_bos = not (self.bos_text and text.startswith(self.bos_text))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def scorer(self, batch_size: int = 1):
        """llama.cpp evaluates one sequence at a time, so batch_size does not apply. It keeps the
        logits of every position only when opened with logits_all, which costs n_ctx x vocab floats
        (800 MB for SmolLM2 at 4096) and slows every prefill. Generation never needs them, so a
        handle opened without them gets a second one on the same file (weights are memory-mapped,
        so shared) on the first call, as `slimlm eval` opens its own for scoring."""
        from slimlm.models.backends.llamacpp_scoring import LlamaCppScorer

        if self.logits_all:
            return LlamaCppScorer(self)
        if self._score_llm is None:
            self._score_llm = self._open(self.context_length, logits_all=True)
        return LlamaCppScorer(self, self._score_llm)

    def apply_adapters(self, adapters: dict[str, str], loader=None) -> None:
        # llama.cpp takes a LoRA file when a model is opened (llama-cpp-python's `lora_path`), one
        # per handle, so serving several adapters would mean several handles: not done yet.
        raise SlimlmError(f"adapters need the torch backend ({self.label} opens LoRA files per model): serve "
                          "a Hugging Face folder with --backend torch, or merge the adapter into the model")

    def decoder(self, slots: int, batch_tokens: int, context: int | None = None):
        """Continuous batching on llama.cpp's multi-sequence context (llamacpp_decoder.py); each
        slot gets `context` tokens (default: this handle's context)."""
        from slimlm.models.backends.llamacpp_decoder import LlamaCppDecoder

        return LlamaCppDecoder(self.llm, slots, batch_tokens, context or self.llm.n_ctx())

    def _stream_tokens(self, prompt_ids: list[int], params: GenerationParams) -> Iterator[str]:
        room = self.llm.n_ctx() - len(prompt_ids)
        if room < 1:
            raise SlimlmError(f"the prompt ({len(prompt_ids)} tokens) fills the context ({self.llm.n_ctx()}): shorten it")
        stream = self.llm.create_completion(
            prompt=prompt_ids, max_tokens=min(params.max_tokens, room), temperature=params.temperature,
            top_p=params.top_p, top_k=0, min_p=0.0, repeat_penalty=1.0,
            seed=params.seed if params.seed is not None else -1, stream=True)
        for chunk in stream:
            choice = chunk["choices"][0]
            if choice.get("finish_reason"):  # the closing chunk carries no new token
                self._finish = "stop" if choice["finish_reason"] == "stop" else self._finish
                if not choice["text"]:
                    continue
            self._generated += 1
            yield choice["text"]  # one chunk per token, even when its text is still incomplete

    def close(self) -> None:
        if self._score_llm is not None:
            self._score_llm.close()
            self._score_llm = None
        self.llm.close()
