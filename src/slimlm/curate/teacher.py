"""The teacher a curation step asks: any model slimlm loads (its chat template, greedy decoding),
or an OpenAI-compatible URL through the client `slimlm serve` uses for its large model
(serve/upstream.py: retries with exponential backoff, the API key read from an environment
variable and never logged). A teacher that stays unreachable after its retries raises
UpstreamUnavailable; the callers keep what they already have, so a rerun continues."""

from __future__ import annotations

import asyncio

from slimlm.errors import SlimlmError


class TeacherStopped(SlimlmError):
    """The teacher stayed away; `answers` holds what it did answer of the last batch (None: not)."""

    def __init__(self, message: str, answers: list[str | None]):
        super().__init__(message)
        self.answers = answers


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
        return self.ask_many([prompt])[0]

    def ask_many(self, prompts: list[str]) -> list[str]:
        """Answers in order. A URL gets the prompts at once (concurrent requests, as a serving
        engine batches them); a local model answers one after another."""
        if self._client is None and self._engine is None:
            self._open()
        if self._client is not None:
            from slimlm.serve.upstream import UpstreamUnavailable

            async def all_of():
                return await asyncio.gather(*(self._client.chat(self._body(p)) for p in prompts),
                                            return_exceptions=True)

            answers = self._loop.run_until_complete(all_of())
            failed = next((a for a in answers if isinstance(a, BaseException)), None)
            if failed is None:
                return [self._content(a) for a in answers]
            if not isinstance(failed, UpstreamUnavailable):
                raise failed
            last = str(failed).rpartition("(last: ")[2].partition(")")[0] or "no answer"
            raise TeacherStopped(f"the teacher {self.spec} did not answer after {self.retries + 1} tries "
                                 f"(last: {last}); what it answered before is kept",
                                 [None if isinstance(a, BaseException) else self._content(a) for a in answers])
        from slimlm.models.backends import GenerationParams

        params = GenerationParams(max_tokens=self.max_tokens, temperature=0.0)
        return [self._engine.generate([{"role": "user", "content": p}], params).text for p in prompts]

    def _body(self, prompt: str) -> dict:
        return {"model": self.model_name, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "temperature": 0}

    def _content(self, answer: dict) -> str:
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise SlimlmError(f"teacher {self.spec} answered without choices[0].message.content: is it an "
                              "OpenAI-compatible chat API?") from None

    def close(self) -> None:
        if self._client is not None:
            self._loop.run_until_complete(self._client.aclose())
            self._loop.close()
        if self._engine is not None:
            self._engine.close()
        self._client = self._engine = self._loop = None
