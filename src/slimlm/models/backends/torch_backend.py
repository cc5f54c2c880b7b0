"""torch/transformers backend: any architecture transformers knows, on CPU or GPU.

The fast path is a plain decode loop over the model's forward with a KV cache (no `generate()`
machinery per step) and a precision plan measured on the CPU at hand (see precision.py): on a
CPU without native bf16, prefill runs in fp32 (compute-bound, where emulated bf16 is several
times slower) and decode in bf16 (memory-bound, where half the bytes per weight nearly doubles
the speed), with the KV cache cast between the two. Where the probe finds oneDNN's kernels
faster than the plain ones, the linear layers get their weights packed for it once (onednn.py).

Scoring and token bytes are in torch_scoring.py, LoRA adapters in torch_adapters.py, batched
generation in batch.py; this class is what consumers see of them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

from slimlm.hardware import best_torch_device, default_threads
from slimlm.models.backends.base import Backend, GenerationParams, Messages
from slimlm.models.backends.precision import PrecisionPlan, choose_precision
from slimlm.models.backends.torch_cache import cache_keyword, cast_cache
from slimlm.models.reference import ModelRef

# End-of-turn tokens of common chat templates. A GGUF converted by transformers often lists
# only <eos> as its end token, while the chat template ends each turn with one of these.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>")


class TorchBackend(Backend):
    name = "torch"
    capabilities = frozenset({"score", "adapters", "batch", "dtype", "continuous"})

    @classmethod
    def prefers(cls, ref: ModelRef) -> bool:
        """Never `auto`'s first choice: torch is the fallback that runs whatever transformers loads."""
        return False

    def __init__(self, ref: ModelRef, dtype: str = "auto", device: str = "auto",
                 threads: int | None = None, n_ctx: int | None = None) -> None:
        super().__init__()
        import torch

        from slimlm.models.backends.onednn import pack_linears
        from slimlm.models.loading import load_torch

        self.device = best_torch_device() if device == "auto" else device
        if self.device == "cpu":
            torch.set_num_threads(threads or default_threads())
        self.plan: PrecisionPlan = choose_precision(self.device, dtype)
        self.ref = ref
        self.model, self.tokenizer = load_torch(ref, dtype=self.plan.prefill, device=self.device)
        if self.plan.split:
            self.decode_model = copy.deepcopy(self.model).to(self.plan.decode)
        else:
            self.decode_model = self.model
        # Last: .to() would not move the packed copies. Packing a model twice (no split) is a no-op.
        for model, dtype in ((self.model, self.plan.prefill), (self.decode_model, self.plan.decode)):
            if dtype in self.plan.onednn:
                pack_linears(model)
        self.stop_ids = self._stop_ids()
        self.n_ctx = n_ctx  # a cap on the model's own context (serve --n-ctx)
        self._peft = None  # the PeftModel around self.model once adapters are loaded
        self._adapter: str | None = None
        self._bytes_table: dict | None = None
        if not self.batchable:
            self.capabilities = type(self).capabilities - {"continuous"}

    @property
    def batchable(self) -> bool:
        """Whether sequences can decode together (torch_decoder.py): every layer's cache must hold
        the whole sequence; a sliding-window layer (Gemma 3's local attention) keeps only its
        window, and rows of different lengths cannot share that layout."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in DynamicCache(config=self.model.config).layers)

    def decoder(self, slots: int, batch_tokens: int, context: int | None = None):
        """Continuous batching (torch_decoder.py): prompts read alone, decoding slots stepped
        together over a left-padded batched cache."""
        from slimlm.errors import BackendUnavailable
        from slimlm.models.backends.torch_decoder import TorchDecoder

        if not self.supports("continuous"):  # decided once, in __init__, from self.batchable
            raise BackendUnavailable(f"{self.model.config.model_type} has sliding-window layers, which the torch "
                                     "backend decodes one sequence at a time: use --parallel 1 or the llamacpp backend")
        return TorchDecoder(self, slots, batch_tokens, context or self.context_length)

    def _stop_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is None:
                continue
            ids.update(source if isinstance(source, list) else [source])
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
        return ids

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def precision(self) -> str:
        return f"{self.plan.short()} ({self.device})"

    def describe(self) -> str:
        return self.plan.describe()

    @property
    def context_length(self) -> int:
        config = self.model.config
        native = (getattr(config, "max_position_embeddings", None)
                  or getattr(getattr(config, "text_config", None), "max_position_embeddings", None) or 4096)
        return min(native, self.n_ctx) if self.n_ctx else native

    def uses_accelerator(self) -> bool:
        return self.device != "cpu"

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def token_bytes(self, token: int) -> bytes:
        from slimlm.models.backends.torch_scoring import byte_decoder, token_bytes

        if self._bytes_table is None:
            self._bytes_table = byte_decoder(self.tokenizer)
        return token_bytes(self.tokenizer, self._bytes_table, token)

    def scorer(self, batch_size: int = 1):
        """Scores on the prefill copy of the weights (the full-precision one when the plan splits)."""
        from slimlm.models.backends.torch_scoring import TorchScorer

        return TorchScorer(self, batch_size=batch_size)

    def apply_adapters(self, adapters: dict[str, str], loader=None) -> None:
        from slimlm.models.backends.torch_adapters import load_adapters

        if adapters:
            self._peft, self._adapter = load_adapters(self, adapters, loader), "<none>"

    def use_adapter(self, name: str | None) -> None:
        from slimlm.models.backends.torch_adapters import switch

        if self._peft is None or name == self._adapter:
            return
        switch(self._peft, name)
        self._adapter = name

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int,
                       temperature: float = 0.0) -> list[tuple[str, bool]]:
        """One batch through transformers' generate on the prefill copy: the caller opens the
        backend in fp32 when it wants one copy of the weights (no bf16 decode copy)."""
        from slimlm.models.backends import batch

        pad = self.tokenizer.pad_token_id
        outs = batch.generate_batch(self.model, prompts, max_new_tokens, 0 if pad is None else pad,
                                    self.stop_ids, temperature)
        return [(self.tokenizer.decode([t for t in toks if t not in self.stop_ids], skip_special_tokens=True), stopped)
                for toks, stopped in outs]

    def render_chat(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))  # the template wrote BOS itself
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def _sample(self, logits, params: GenerationParams, generator):
        import torch

        if params.temperature <= 0:
            return int(logits.argmax(-1))
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p
            probs = torch.zeros_like(probs).scatter(-1, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _stream_tokens(self, prompt_ids: list[int], params: GenerationParams) -> Iterator[str]:
        import torch
        from transformers import DynamicCache

        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        limit = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        max_new = max(0, min(params.max_tokens, limit - len(prompt_ids)))
        decoder = _Detokenizer(self.tokenizer)
        prefill_kw, decode_kw = cache_keyword(self.model), cache_keyword(self.decode_model)
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            ids = torch.tensor([prompt_ids], device=self.device)
            logits = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{prefill_kw: cache}).logits
            if self.plan.split:
                cast_cache(cache, self.plan.decode)
            for _ in range(max_new):
                token = self._sample(logits[0, -1], params, generator)
                if token in self.stop_ids:
                    self._finish = "stop"
                    break
                self._generated += 1
                yield decoder.add(token)
                step = torch.tensor([[token]], device=self.device)
                logits = self.decode_model(input_ids=step, use_cache=True, logits_to_keep=1,
                                           **{decode_kw: cache}).logits
        tail = decoder.flush()
        if tail:
            yield tail


class _Detokenizer:
    """Incremental decoding that never splits a multi-byte character or a merged word piece.

    Decoding tokens one by one garbles byte-level BPE output; decoding a short window of
    recent tokens and emitting only the new, complete suffix does not (as in TGI's streaming).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def _new_text(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        return after[len(before):]

    def add(self, token: int) -> str:
        self.ids.append(token)
        new = self._new_text()
        if new and not new.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        new = self._new_text()
        self.prefix = self.read = len(self.ids)
        return new
