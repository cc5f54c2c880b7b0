"""The one interface every inference backend implements, and everything a consumer may ask of it.

A backend turns a prompt (raw text, or chat messages rendered with the model's own template)
into a stream of text pieces, and reports how long that took. Stop strings, timing and the
text-vs-messages decision live here once; a backend only has to produce tokens.

Everything else a consumer needs (the context length, the vocabulary, a token's bytes,
generation from token ids, log-likelihood scoring, LoRA adapters) is a method or property of
this class, and `supports(capability)` says which optional parts a backend has. Consumers ask;
they never branch on a backend's name or reach into its model or handle, so a new backend is
one module plus one line in `BACKENDS` (models/backends/__init__.py).
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slimlm.errors import BackendUnavailable, SlimlmError

if TYPE_CHECKING:
    from slimlm.models.backends.scoring import Scorer
    from slimlm.models.reference import ModelRef

Messages = list[dict]

# What `supports()` can be asked about:
#   score     log-likelihoods of token sequences (`scorer()`)
#   adapters  LoRA adapters on the loaded weights (`apply_adapters()`, `use_adapter()`)
#   batch     several prompts generated in one batch (`generate_batch()`)
#   dtype     a chosen compute precision (the `dtype=` of the constructor)
#   continuous  continuous batching: sequences join and leave a running batch (`decoder()`)
CAPABILITIES = ("score", "adapters", "batch", "dtype", "continuous")


class _class_or_instance:
    """A method that runs on a backend class (what that kind of backend can do, asked before any
    model is open) or on a loaded backend (what this model can do: an instance may narrow its
    `capabilities`, e.g. a torch model whose cache layout cannot be batched)."""

    def __init__(self, func) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    def __get__(self, obj, owner):
        return functools.partial(self.func, owner if obj is None else obj)


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> "GenerationParams":
        if self.max_tokens < 1:
            raise SlimlmError(f"--max-tokens must be at least 1 (got {self.max_tokens})")
        if self.temperature < 0:
            raise SlimlmError(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise SlimlmError(f"--top-p must be in (0, 1] (got {self.top_p})")
        return self


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0  # request start to first generated token
    total_s: float = 0.0
    finish_reason: str = "length"

    @property
    def decode_tps(self) -> float:
        """Tokens per second after the first token (the steady-state decode rate)."""
        steps = self.generated_tokens - 1
        span = self.total_s - self.ttft_s
        return steps / span if steps > 0 and span > 0 else 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0


@dataclass
class Completion:
    text: str
    timings: Timings


class StopText:
    """A completion's text as it streams, cut at the first stop string: `push` returns what is
    safe to show (text that might be the start of a stop string is held back until it cannot
    be), `stopped` turns true at a stop string, and `flush` gives what was held at the end."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held, self.stopped = "", False

    def push(self, piece: str) -> str:
        self.held += piece
        cut = min((self.held.find(s) for s in self.stops if s in self.held), default=-1)
        if cut >= 0:
            out, self.held, self.stopped = self.held[:cut], "", True
            return out
        safe = len(self.held) - max(self.longest - 1, 0)
        if safe <= 0:
            return ""
        out, self.held = self.held[:safe], self.held[safe:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class Backend(ABC):
    """A loaded model that generates text. Subclasses implement the four abstract methods, and
    override the optional parts they have (listing them in `capabilities`)."""

    name: str = "base"  # the key in BACKENDS; for messages use `label`
    capabilities: frozenset[str] = frozenset()
    ref: ModelRef | None = None

    def __init__(self) -> None:
        self.last_timings = Timings()

    # -- what a backend provides -------------------------------------------------------------
    @property
    @abstractmethod
    def chat_template(self) -> str | None: ...

    @abstractmethod
    def render_chat(self, messages: Messages) -> str:
        """The prompt text the model's chat template makes of `messages` (generation prompt added)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (special tokens in the text are parsed as such)."""

    @abstractmethod
    def _stream_tokens(self, prompt_ids: list[int], params: GenerationParams) -> Iterator[str]:
        """Yield decoded text pieces, adding 1 to self._generated for each new token; set
        self._finish to 'stop' if the model ended the text."""

    def precision(self) -> str:
        """A short label for how the weights are stored and computed (shown in tables)."""
        return "?"

    def describe(self) -> str:
        """A longer account of how this backend computes (benchmark notes); the precision by default."""
        return self.precision()

    @property
    def label(self) -> str:
        """The backend's name for messages, tables and run records."""
        return self.name

    @_class_or_instance
    def supports(self, capability: str) -> bool:
        """Whether this backend has an optional part (see CAPABILITIES): ask instead of testing names.
        Ask BACKENDS[name] before opening a model, or the loaded backend for what its model can do."""
        return capability in self.capabilities

    @classmethod
    def scoring_options(cls, context: int) -> dict:
        """Constructor settings for a backend opened mainly to score sequences of up to `context`
        tokens (llama.cpp keeps every position's logits only when asked at open)."""
        return {}

    @property
    def context_length(self) -> int:
        """Most tokens (prompt plus generated) one sequence may hold."""
        raise BackendUnavailable(f"the {self.label} backend does not report its context length")

    @property
    def vocab_size(self) -> int:
        """Rows of the model's output layer (log-probability rows have this many entries)."""
        raise BackendUnavailable(f"the {self.label} backend does not report its vocabulary size")

    def uses_accelerator(self) -> bool:
        """Whether the model computes on a GPU (or other accelerator) rather than the CPU."""
        return False

    def token_bytes(self, token: int) -> bytes:
        """A token's own bytes, which may be part of a character (byte-level vocabularies): what
        OpenAI's `bytes` field carries."""
        raise BackendUnavailable(f"the {self.label} backend cannot give a token's bytes")

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def scorer(self, batch_size: int = 1) -> Scorer:
        """A log-likelihood scorer on this model (models/backends/scoring.py), computed natively."""
        raise BackendUnavailable(f"the {self.label} backend cannot give log-likelihoods: use --backend torch")

    def apply_adapters(self, adapters: dict[str, str], loader=None) -> None:
        """Load LoRA adapters {name: folder} onto the weights; `use_adapter` then selects one."""
        raise SlimlmError(f"adapters need the torch backend (the {self.label} backend cannot load them): serve a "
                          "Hugging Face folder with --backend torch, or merge the adapter into the model")

    def use_adapter(self, name: str | None) -> None:
        """Select an adapter loaded by apply_adapters (None: the plain base model)."""
        if name is not None:
            raise SlimlmError(f"the {self.label} backend has no adapter '{name}'")

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int,
                       temperature: float = 0.0) -> list[tuple[str, bool]]:
        """Continue several prompts (token ids) at once: (text, stopped) per prompt."""
        raise BackendUnavailable(f"the {self.label} backend generates one prompt at a time")

    def decoder(self, slots: int, batch_tokens: int, context: int | None = None):
        """A SequenceDecoder (decoder.py) running `slots` sequences of up to `context` tokens each
        in shared forward passes of at most `batch_tokens` tokens."""
        raise BackendUnavailable(f"the {self.label} backend decodes one sequence at a time")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    # -- shared behaviour ---------------------------------------------------------------------
    def prompt_text(self, prompt: str | Messages, raw: bool = False) -> str:
        """Chat messages are rendered with the template; a plain string is wrapped as one user
        turn for chat models unless `raw` is set."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise SlimlmError("the prompt is empty: give some text to complete")
            if raw or not self.chat_template:
                return prompt
            prompt = [{"role": "user", "content": prompt}]
        if not self.chat_template:
            raise SlimlmError("this model has no chat template: pass plain text with --raw")
        return self.render_chat(prompt)

    def stream(self, prompt: str | Messages, params: GenerationParams | None = None,
               raw: bool = False) -> Iterator[str]:
        """Yield the completion as it is generated, honouring stop strings; fills last_timings.
        The time to first token counts from here, so it includes rendering and tokenizing."""
        params = (params or GenerationParams()).validate()
        start = time.perf_counter()
        ids = self.tokenize(self.prompt_text(prompt, raw=raw))
        yield from self._stream_from(ids, params, start)

    def stream_ids(self, ids: list[int], params: GenerationParams | None = None) -> Iterator[str]:
        """`stream` from token ids (a server that received ids, or scored a prompt it tokenized once)."""
        params = (params or GenerationParams()).validate()
        yield from self._stream_from(list(ids), params, time.perf_counter())

    def _stream_from(self, ids: list[int], params: GenerationParams, start: float) -> Iterator[str]:
        timings = Timings(prompt_tokens=len(ids))
        self.last_timings = timings
        self._finish, self._generated = "length", 0
        text = StopText(params.stop)
        for piece in self._stream_tokens(ids, params):
            now = time.perf_counter() - start
            if timings.generated_tokens == 0:
                timings.ttft_s = now
            timings.generated_tokens = self._generated
            timings.total_s = now
            out = text.push(piece)
            if out:
                yield out
            if text.stopped:
                self._finish = "stop"
                break
        else:
            if rest := text.flush():
                yield rest
        timings.total_s = time.perf_counter() - start
        timings.finish_reason = self._finish

    def generate(self, prompt: str | Messages, params: GenerationParams | None = None,
                 raw: bool = False) -> Completion:
        text = "".join(self.stream(prompt, params, raw=raw))
        return Completion(text=text, timings=self.last_timings)
