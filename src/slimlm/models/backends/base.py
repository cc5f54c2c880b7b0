"""The one interface both inference backends implement.

A backend turns a prompt (raw text, or chat messages rendered with the model's own template)
into a stream of text pieces, and reports how long that took. Stop strings, timing and the
text-vs-messages decision live here once; a backend only has to produce tokens.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

from slimlm.errors import SlimlmError

Messages = list[dict]


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


class Backend(ABC):
    """A loaded model that generates text. Subclasses implement the four abstract methods."""

    name: str = "base"

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
        """Yield the completion as it is generated, honouring stop strings; fills last_timings."""
        params = (params or GenerationParams()).validate()
        start = time.perf_counter()
        ids = self.tokenize(self.prompt_text(prompt, raw=raw))
        timings = Timings(prompt_tokens=len(ids))
        self.last_timings = timings
        self._finish, self._generated = "length", 0
        held = ""  # text that might be the start of a stop string
        longest = max((len(s) for s in params.stop), default=0)
        for piece in self._stream_tokens(ids, params):
            now = time.perf_counter() - start
            if timings.generated_tokens == 0:
                timings.ttft_s = now
            timings.generated_tokens = self._generated
            timings.total_s = now
            held += piece
            cut = min((held.find(s) for s in params.stop if s in held), default=-1)
            if cut >= 0:
                if held[:cut]:
                    yield held[:cut]
                self._finish = "stop"
                break
            safe = len(held) - max(longest - 1, 0)
            if safe > 0:
                yield held[:safe]
                held = held[safe:]
        else:
            if held:
                yield held
        timings.total_s = time.perf_counter() - start
        timings.finish_reason = self._finish

    def generate(self, prompt: str | Messages, params: GenerationParams | None = None,
                 raw: bool = False) -> Completion:
        text = "".join(self.stream(prompt, params, raw=raw))
        return Completion(text=text, timings=self.last_timings)
