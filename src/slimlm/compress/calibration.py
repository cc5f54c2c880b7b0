"""What every calibrated method shares: the calibration windows, the decoder layers, the fp32
calibration model and the loop that runs the windows through it.

GPTQ (Hessians), AWQ (activation statistics), Wanda (input norms), SparseGPT (Hessians) and the
structured pruners (block influence, activation importance) all measure a model on the same kind
of input: up to `samples` windows of `seq_len` tokens, evenly spread over the concatenated
calibration text, run once through the full-precision model with hooks doing the collecting.
Keeping that here, in one module every method imports, is what lets the methods stay independent
of each other (no method imports another method's helpers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.progress import progress_bar

__all__ = ["calibration_windows", "run_calibration", "find_decoder_layers", "calibration_model", "CALIB_SAMPLES",
           "CALIB_SEQ_LEN"]

# How much calibration text the calibrated methods need (issue 16): GPTQ estimates a d x d input
# Hessian per linear, d up to 1536 (SmolLM2-135M's down_proj) or 2048 (Gemma 3 270M's). 32 windows
# of 256 tokens (8,192 tokens, the old default) are 5.3 tokens per Hessian column of a 1536-wide
# layer; 128 x 256 = 32,768 tokens are 21. On SmolLM2-135M the extra tokens lower GPTQ's output
# error on held-out prose from 0.681 to 0.629 of round-to-nearest's (python-docs calibration) and
# from 0.524 to 0.491 (mix), and on every other corpus too (compress/gptq.py has the table). The
# default of quantize(), QuantRequest and `slimlm quantize --calib-samples`.
CALIB_SAMPLES = 128
CALIB_SEQ_LEN = 256


def calibration_windows(tokenizer, texts: list[str], samples: int, seq_len: int):
    """Token windows [n, seq_len] (a torch tensor), n = min(samples, tokens // seq_len), evenly
    spread from the start to the end of the joined `texts`; too little text is an error."""
    import torch

    if samples < 1 or seq_len < 1:
        raise SlimlmError(f"calibration needs samples >= 1 and seq_len >= 1, got {samples} and {seq_len}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt",
                    verbose=False)["input_ids"][0]
    if ids.numel() < seq_len:
        raise SlimlmError(f"calibration text is shorter than one sequence: {ids.numel()} tokens for a "
                          f"sequence of {seq_len}: give more text or a shorter --seq-len")
    n = min(samples, ids.numel() // seq_len)
    starts = np.linspace(0, ids.numel() - seq_len, n).round().astype(int)
    return torch.stack([ids[s:s + seq_len] for s in starts])


def run_calibration(model, windows, batch_size: int, label: str, progress: bool,
                    after_batch: Callable[[], None] = lambda: None) -> None:
    """Run the calibration windows through `model` in batches (hooks do the collecting);
    `after_batch` runs after each batch (e.g. to forget a tensor a hook compared against)."""
    import torch

    device = next(model.parameters()).device
    bar = (progress_bar(label, len(range(0, len(windows), batch_size)))
           if progress else contextlib.nullcontext(lambda n=1: None))
    with torch.no_grad(), bar as advance:
        for at in range(0, len(windows), batch_size):
            model(input_ids=windows[at:at + batch_size].to(device), use_cache=False)
            after_batch()
            advance()


def find_decoder_layers(model):
    """The nn.ModuleList of decoder blocks (the model's decoder's `layers`, else the first module
    list named like `*layers`), or None for a model without one."""
    from torch import nn

    with contextlib.suppress(Exception):
        layers = model.get_decoder().layers
        if isinstance(layers, nn.ModuleList):
            return layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers"):
            return module
    return None


@contextlib.contextmanager
def calibration_model(model_folder, calib_texts: list[str] | None):
    """(fp32 model on the GPU if there is one, tokenizer, texts), freed afterwards. calib_texts
    defaults to the default calibration set (data.DEFAULT_CALIB: `mix`, which holds no held-out
    text of any evaluation corpus)."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.data import DEFAULT_CALIB, calibration_corpus

    texts = calib_texts if calib_texts is not None else calibration_corpus(DEFAULT_CALIB)
    tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
    model = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.to("cuda")
    try:
        yield model, tokenizer, texts
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
