"""A multi-turn conversation over any backend, separate from the terminal so it can be tested.

The whole history is re-rendered with the model's chat template each turn; llama.cpp reuses
the KV cache for the unchanged prefix, so earlier turns are not recomputed there.
"""

from __future__ import annotations

from collections.abc import Iterator

from slimlm.models.backends import Backend, GenerationParams

COMMANDS = {"/reset": "forget the conversation", "/exit": "leave", "/help": "list commands"}


class ChatSession:
    def __init__(self, backend: Backend, params: GenerationParams, system: str | None = None) -> None:
        self.backend, self.params, self.system = backend, params, system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def handle(self, line: str) -> Iterator[str] | None:
        """The reply to one input line, streamed; None means the user asked to leave."""
        text = line.strip()
        if text in ("/exit", "/quit"):
            return None
        if text == "/reset":
            self.reset()
            return iter(["(conversation reset)"])
        if text == "/help":
            return iter(["\n".join(f"{k}  {v}" for k, v in COMMANDS.items())])
        if not text:
            return iter([])
        return self._answer(text)

    def _answer(self, text: str) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        pieces = []
        for piece in self.backend.stream(self.messages, self.params):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
