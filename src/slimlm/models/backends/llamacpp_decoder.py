"""llama.cpp's own multi-sequence batching for slimlm's continuous batching (decoder.py).

One llama.cpp context with `slots` sequence ids, each with its own KV stream (as `llama-server
--parallel N` runs without --kv-unified), fed through the bindings' low-level API: a step's
decoding tokens go to one `llama_decode` whose tokens carry their own sequence id and position,
and `llama_get_logits_ith` reads each one's logits by its index in that batch.

Same tokens as one request at a time, measured: llama.cpp's results depend on the shapes it
computes (its CPU matmuls quantize activations to 8 bits, so a different summation order can
move a logit by ~0.5 and flip a greedy choice). Three choices keep every shape what the
single-request path computes, and the tests hold greedy tokens equal: per-sequence KV streams
(in one unified cache a sequence's cells interleave with the others' and its attention sums in
another order: logits moved by up to 1.3 on SmolLM2); prompt chunks kept out of the decode
tokens' `llama_decode` (mixed in, llama.cpp splits the batch into equal-length sequence pieces,
so each prompt's first token rides with the decode tokens, and greedy tokens differed: measured
with the tiny test model); and prompt chunks of the backend's own `n_ubatch`. A batch of single
decode tokens from several streams computes each row as alone, and the step's prompt chunks share
`llama_decode`s of their own, in slot order: on SmolLM2's Q4_1 six prompts of 45-52 tokens read
together gave the logits each gets alone bit for bit (measured), and the tests hold greedy tokens
equal (tiny f32 model: logits within 1e-5).

First tokens first: a step reads its joining prompts before its decode tokens, PROMPTS_PER_PASS to
a `llama_decode`, and each pass's first tokens are sampled and streamed before the next pass runs.
Prompt reading costs llama.cpp about the same per token whether 4 or 16 prompts share a pass, so
when 16 clients come back together (bench/serve_load.py), one pass of all 16 prompts gave every
one of them its first token only at the end (~650 ms on SmolLM2 here), while passes of 4 give
the first four theirs after a quarter of that, the last four at about the same time as before.

Why the low-level API: llama-cpp-python's `Llama` only ever uses sequence 0, and its
`LlamaBatch.add_sequence` helper indexes logits wrongly for every sequence after the first, so
neither can batch. Running `llama-server` as a child process would batch too, but then logprobs,
the scorer and adapters would live in another process; bench/serve.py measures both.

The context copies the backend's own settings (threads, flash attention, KV types), so one
sequence here runs the kernels the single-request path runs; the tests hold greedy tokens from
here against the single-request stream.
"""

from __future__ import annotations

import ctypes

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.models.backends.decoder import SequenceDecoder


class LlamaCppDecoder(SequenceDecoder):
    def __init__(self, llm, slots: int, batch_tokens: int, context: int) -> None:
        import llama_cpp

        super().__init__(slots, batch_tokens, context)
        self._lib, self._llm = llama_cpp, llm
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_ctx = context * slots
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_seq_max = slots
        params.kv_unified = False  # a KV stream per sequence: see the module docstring
        self._ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not self._ctx:
            raise SlimlmError(f"llama.cpp could not allocate {slots} slots of {context} tokens: lower --parallel or "
                              "--n-ctx")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self._n_vocab = llm.n_vocab()
        self.chunk = int(params.n_ubatch)  # the longest prompt piece read at once, as the single path
        self._batch = llama_cpp.llama_batch_init(max(batch_tokens, self.chunk), 0, 1)
        self.passes = 0  # llama_decode calls in the last step

    def is_end(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def text_bytes(self, token: int) -> bytes:
        return self._llm.detokenize([token], special=False)  # what create_completion's stream writes

    PROMPTS_PER_PASS = 4  # joining prompts read in one llama_decode (see "First tokens first" above)

    def _passes(self, entries):
        reading = sorted((e for e in entries if len(e[1]) > 1), key=lambda e: e[0])
        decoding = [e for e in entries if len(e[1]) == 1]
        self.passes = 0
        # prompt chunks first, a few per pass, in slot order: llama.cpp puts consecutive sequence
        # ids in one ubatch; each pass's first tokens are sampled before the next pass runs
        for at in range(0, len(reading), self.PROMPTS_PER_PASS):
            self.passes += 1
            yield self._decode(reading[at:at + self.PROMPTS_PER_PASS])
        if decoding:
            self.passes += 1
            yield self._decode(decoding)

    def _decode(self, entries):
        lib, b = self._lib, self._batch
        i, wanted = 0, {}
        for slot, tokens, start, want in entries:
            for k, tok in enumerate(tokens):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, start + k, 1
                b.seq_id[i][0] = slot
                b.logits[i] = 0
                i += 1
            if want:
                b.logits[i - 1] = 1
                wanted[slot] = i - 1
        b.n_tokens = i
        rc = lib.llama_decode(self._ctx, b)
        if rc != 0:
            raise SlimlmError(f"llama.cpp could not decode a batch of {i} tokens (code {rc}): the shared cache is "
                              "full; lower --parallel or --batch-tokens")
        out = {}
        for slot, row in wanted.items():
            ptr = lib.llama_get_logits_ith(self._ctx, row)
            out[slot] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                              shape=(self._n_vocab,)).copy()
        return out

    compact = True  # a step's sequences run in one pass only while their ids are consecutive

    def _save(self, slot: int):
        # The sequence's cells only (llama-server's prompt cache saves the same way), not the whole
        # stream: a whole-stream copy (llama_memory_seq_cp across streams) moves every cell of the
        # context and is applied only at the next decode, so a state read before it would be stale.
        lib = self._lib
        n = lib.llama_state_seq_get_size_ext(self._ctx, slot, 0)
        blob = (ctypes.c_uint8 * n)()
        if lib.llama_state_seq_get_data_ext(self._ctx, blob, n, slot, 0) != n:
            raise SlimlmError(f"llama.cpp could not save slot {slot}'s cache")
        return blob

    def _load(self, slot: int, blob) -> None:
        # Restored cells are contiguous from the stream's start, where a prompt read into an empty
        # stream lies too: the logits equal those of reading in place (tests/models/test_decoder.py).
        if self._lib.llama_state_seq_set_data_ext(self._ctx, blob, len(blob), slot, 0) != len(blob):
            raise SlimlmError(f"llama.cpp could not restore a saved prompt into slot {slot}: its context is too "
                              "small; raise --n-ctx")

    def _truncate(self, slot: int, keep: int) -> int:
        if self._lib.llama_memory_seq_rm(self._mem, slot, keep, -1):
            return keep
        self._lib.llama_memory_seq_rm(self._mem, slot, -1, -1)  # a cache that cannot cut (recurrent models)
        return 0

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None
