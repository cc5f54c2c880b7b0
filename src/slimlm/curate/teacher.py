"""The teacher a curation step asks: any model slimlm loads (its chat template, greedy decoding),
or an OpenAI-compatible URL through the client `slimlm serve` uses for its large model
(serve/upstream.py: retries with exponential backoff, the API key read from an environment
variable and never logged). A teacher that stays unreachable after its retries raises
UpstreamUnavailable; the callers keep what they already have, so a rerun continues."""

from __future__ import annotations

import asyncio

from slimlm.errors import SlimlmError


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


class Teacher:
    """`ask(prompt) -> answer text`, one prompt at a time, deterministic (temperature 0)."""

    def __init__(self, spec: str, api_key_env: str | None = None, model_name: str | None = None,
                 max_tokens: int = 256, retries: int = 4, backoff_s: float = 1.0, backend: str = "auto"):
        if not spec:
            raise SlimlmError("no teacher: give a model (a folder, .gguf or built-in name) or an OpenAI-compatible URL")
        self.spec, self.max_tokens, self.model_name = spec, max_tokens, model_name or "default"
        self.api_key_env, self.retries, self.backoff_s, self.backend = api_key_env, retries, backoff_s, backend
        self._client = self._engine = self._loop = None

    def _open(self) -> None:
        if is_url(self.spec):
            from slimlm.serve.upstream import Upstream

            self._loop = asyncio.new_event_loop()
            self._client = Upstream(self.spec, api_key_env=self.api_key_env, retries=self.retries,
                                    backoff_s=self.backoff_s, timeout_s=120.0)
        else:
            from slimlm.models.backends import open_backend

            self._engine = open_backend(self.spec, self.backend)

    def ask(self, prompt: str) -> str:
        if self._client is None and self._engine is None:
            self._open()
        messages = [{"role": "user", "content": prompt}]
        if self._client is not None:
            body = {"model": self.model_name, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0}
            from slimlm.serve.upstream import UpstreamUnavailable

            try:
                answer = self._loop.run_until_complete(self._client.chat(body))
            except UpstreamUnavailable as exc:
                last = str(exc).rpartition("(last: ")[2].partition(")")[0] or "no answer"
                raise SlimlmError(f"the teacher {self.spec} did not answer after {self.retries + 1} tries "
                                  f"(last: {last}); what it answered before is kept") from None
            try:
                return answer["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise SlimlmError(f"teacher {self.spec} answered without choices[0].message.content: is it an "
                                  "OpenAI-compatible chat API?") from None
        from slimlm.models.backends import GenerationParams

        return self._engine.generate(messages, GenerationParams(max_tokens=self.max_tokens, temperature=0.0)).text

    def close(self) -> None:
        if self._client is not None:
            self._loop.run_until_complete(self._client.aclose())
            self._loop.close()
        if self._engine is not None:
            self._engine.close()
        self._client = self._engine = self._loop = None
