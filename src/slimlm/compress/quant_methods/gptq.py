"""`gptq`: codes chosen with second-order error compensation from calibration text.

`GPTQ` holds the method's state, as gpt-fast's quantizers do: `prepare` (every layer's Hessians
in one full-precision pass) or `prepare_sequential` (layer by layer, codes chosen as it goes)
builds it, and `quantize_tensor` converts one weight (`encode_tensor`: into a GGUF type of its own,
for K-quant and mixed-precision files). The algorithm itself is compress/gptq.py
and compress/gptq_sequential.py; `GPTQMethod` is what quantize() dispatches to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slimlm.compress.blocks import BlockFormat, rtn
from slimlm.compress.calibration import calibration_model
from slimlm.compress.gptq import DEFAULT_ACT_ORDER, DEFAULT_DAMP, collect_hessians, gptq_quantize
from slimlm.compress.quant_methods.base import QuantJob, QuantMethod, register_quant_method

__all__ = ["GPTQ", "GPTQMethod"]


def _expert_keys(model_folder) -> dict:
    """An MoE checkpoint's expert projections by (layer, expert, role) (gptq_experts.py); {} if dense."""
    from slimlm.compress.gptq_experts import checkpoint_keys
    from slimlm.compress.quant_steps import tensor_shapes

    return checkpoint_keys(tensor_shapes(model_folder))


class GPTQ:
    """prepare() once (calibration), then quantize_tensor() per weight from quantize()'s hook."""

    def __init__(self, damp: float = DEFAULT_DAMP, act_order: bool = DEFAULT_ACT_ORDER):
        self.damp, self.act_order = damp, act_order
        self.hessians: dict = {}
        self.codes: dict = {}  # from prepare_sequential: HF weight name -> (q, d, m)
        self.notes: list[str] = []

    def prepare_sequential(self, model_folder, fmt, calib_texts: list[str] | None = None, samples: int = 32,
                           seq_len: int = 256, progress: bool = True, transform=None, types=None,
                           kept=None) -> "GPTQ":
        """Choose every decoder linear's codes now, layer by layer (gptq_sequential.py); memory holds
        one layer's Hessians at a time. Codes are for llama.cpp's layout (GGUF) unless `transform`
        says otherwise (identity for a Hugging Face folder); `fmt` may be a function of the width.
        With `types` ({HF weight name: GGUF type}) each weight is kept as its type's GGUF bytes
        (data, qtype) instead (gptq_kquant.py), and `fmt` is unused; those in `kept` are the GGUF
        parent's own bytes (source_blocks.py)."""
        from slimlm.compress.gguf_export import layout_transform
        from slimlm.compress.gptq_kquant import typed_coder
        from slimlm.compress.gptq_sequential import sequential_gptq

        coder = None if types is None else typed_coder(types, damp=self.damp, act_order=self.act_order,
                                                       notes=self.notes, kept=kept)
        experts = {k: n for k, n in _expert_keys(model_folder).items() if types is None or n + ".weight" in types}
        with calibration_model(model_folder, calib_texts) as (model, tokenizer, texts):
            self.codes = sequential_gptq(model, tokenizer, transform or layout_transform(model_folder), fmt, texts,
                                         samples=samples, seq_len=seq_len, damp=self.damp,
                                         act_order=self.act_order, progress=progress, coder=coder,
                                         expert_keys=experts)
        return self

    def prepare(self, model_folder, calib_texts: list[str] | None = None, samples: int = 32,
                seq_len: int = 256, progress: bool = True) -> "GPTQ":
        """Collect the Hessians of every decoder linear in one full-precision pass (all kept)."""
        with calibration_model(model_folder, calib_texts) as (model, tokenizer, texts):
            self.hessians = collect_hessians(model, tokenizer, texts, samples=samples, seq_len=seq_len,
                                             progress=progress, expert_keys=_expert_keys(model_folder))
        return self

    def _hessian(self, name_hf: str, w: np.ndarray):
        """The weight's calibration Hessian as numpy, or None (with a note) where there is none that fits."""
        key = name_hf[:-len(".weight")] if name_hf.endswith(".weight") else name_hf
        H = self.hessians.get(key)
        if H is None or w.ndim != 2 or tuple(H.shape) != (w.shape[1], w.shape[1]):
            why = "no calibration Hessian" if H is None else f"Hessian {tuple(H.shape)} does not fit {w.shape}"
            note = f"{name_hf}: {why}, used round-to-nearest"
            if ".experts." in name_hf and H is None:  # one note for all of an MoE's experts
                note = ("MoE experts that no calibration token was routed to have no Hessian: they are "
                        "round-to-nearest")
            if note not in self.notes:
                self.notes.append(note)
            return None
        return H.numpy() if hasattr(H, "numpy") else np.asarray(H)

    def quantize_tensor(self, fmt: str | BlockFormat, name_hf: str, w: np.ndarray):
        if name_hf in self.codes:
            return self.codes[name_hf]
        w = np.asarray(w)
        H = self._hessian(name_hf, w)
        if H is None:
            return rtn(fmt, w)
        return gptq_quantize(fmt, w, H, damp=self.damp, act_order=self.act_order)

    def encode_tensor(self, type_name: str, name_hf: str, w: np.ndarray):
        """(data, qtype) of the weight stored as the GGUF type `type_name`, with GPTQ codes (those
        prepare_sequential chose, or from prepare's Hessians); RTN's bytes where there is no Hessian."""
        from slimlm.compress.gptq_kquant import gptq_encode
        from slimlm.compress.kquant_formats import encode

        if name_hf in self.codes:
            return self.codes[name_hf]
        w = np.asarray(w, dtype=np.float32)
        H = self._hessian(name_hf, w)
        if H is None:
            return encode(type_name, w)
        return gptq_encode(type_name, w, H, damp=self.damp, act_order=self.act_order, notes=self.notes)[:2]


@register_quant_method("gptq")
class GPTQMethod(QuantMethod):
    help = "GPTQ: codes and block scales chosen with second-order error compensation from calibration text"
    calibrated = True
    importance_scales = True  # gptq.DEFAULT_WEIGHTED: diag(H) is the importance
    typed_formats = True  # K-quant super-blocks through gptq_kquant.py; a mix's types from importance-weighted sensitivities

    def prepare(self, job: QuantJob, source: Path) -> None:
        if job.sequential:  # codes in the writer's layout: llama.cpp's for GGUF, as stored for a packed folder
            identity = (lambda name, w: w) if job.kind == "hf" else None  # noqa: E731
            self.gptq = GPTQ().prepare_sequential(source, job.format_for, job.texts, samples=job.samples,
                                                  seq_len=job.seq_len, transform=identity)
        else:
            self.gptq = GPTQ().prepare(source, job.texts, samples=job.samples, seq_len=job.seq_len)
        job.notes.extend(self.gptq.notes)
        self.gptq.notes = job.notes  # the round-to-nearest fallbacks of choose reach the report too

    def choose(self, job: QuantJob, name: str, w: np.ndarray):
        return self.gptq.quantize_tensor(job.format_for(w.shape[1]), name, w)

    def prepare_typed(self, job, source: Path) -> None:
        if job.sequential:  # every weight's GGUF bytes, chosen layer by layer in its own type
            self.gptq = GPTQ().prepare_sequential(source, None, job.texts, samples=job.samples, seq_len=job.seq_len,
                                                  types=job.types, kept=job.kept)
        else:
            self.gptq = GPTQ().prepare(source, job.texts, samples=job.samples, seq_len=job.seq_len)
        job.notes.extend(self.gptq.notes)
        self.gptq.notes = job.notes  # the round-to-nearest fallbacks of encode_typed reach the report too

    def encode_typed(self, job, name: str, w: np.ndarray):
        return self.gptq.encode_tensor(job.types[name], name, w)
