"""`slimlm generate` as a library call: one prompt, streamed, and the run recorded.

The run is recorded here, not by the CLI, as every verb's library function records its own
(eval, bench, quantize, prune, finetune, distill), so a Python caller leaves the same trace in
the run registry as `slimlm generate` does.

    gen = Generation("smollm2-135m-instruct", "Name three prime numbers.")
    text = "".join(gen)                      # streams; the run is recorded when the stream ends
    print(gen.timings.decode_tps, gen.run_id)
"""

from __future__ import annotations

from collections.abc import Iterator

from slimlm.errors import SlimlmError
from slimlm.models.backends import GenerationParams, Timings, open_backend
from slimlm.models.reference import resolve


class Generation:
    """Opens the model (resolving the reference once); iterating streams the completion, then
    records the run and closes the backend."""

    def __init__(self, model: str, prompt: str, params: GenerationParams | None = None, *,
                 backend: str = "auto", raw: bool = False, record: bool = True) -> None:
        if not prompt.strip():
            raise SlimlmError("the prompt is empty: give some text to complete")
        self.params = (params or GenerationParams()).validate()
        self.prompt, self.raw, self.record = prompt, raw, record
        self.ref = resolve(model)
        self.backend = open_backend(self.ref, backend)
        self.label = self.backend.label
        self.timings: Timings | None = None
        self.run_id: int | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.backend.stream(self.prompt, self.params, raw=self.raw)
            self.timings = t = self.backend.last_timings
        finally:
            self.backend.close()
        if self.record:
            from slimlm.runs import record

            self.run_id = record("generate", self.ref, params={"backend": self.label, **self.params.__dict__, "raw": self.raw},
                                 metrics={"prompt_tokens": t.prompt_tokens, "generated_tokens": t.generated_tokens,
                                          "ttft_s": t.ttft_s, "decode_tps": t.decode_tps})
