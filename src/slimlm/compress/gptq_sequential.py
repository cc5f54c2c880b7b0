"""Sequential GPTQ: one decoder layer at a time, as in the GPTQ paper, so memory holds only that
layer's Hessians.

The non-sequential variant (`GPTQ.prepare`) runs the full-precision model once and keeps every
layer's Hessian (for SmolLM2-135M about 0.8 GB of float64). Here:

1. one full-precision pass records the calibration hidden states entering the first decoder
   layer, and the keyword arguments every layer is called with (rotary embeddings, masks: they
   depend on positions only, not on the weights);
2. for each layer in turn: run its calibration inputs through it with Hessian hooks on its
   linears; choose GPTQ codes for each linear *in llama.cpp's layout* (the exact tensor the GGUF
   writer will see, so the cached codes are written as chosen); write the dequantized weights
   back into the layer; run the inputs through the quantized layer to get the next layer's
   inputs; free the layer's Hessians.

So each layer is calibrated on what the already-quantized layers before it really produce (the
error of earlier layers is part of what later ones compensate), and only the codes (about one
byte per weight) outlive a layer.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext

import numpy as np

from slimlm.compress.blocks import dequantize_codes, get_format
from slimlm.compress.calibration import CALIB_SAMPLES, CALIB_SEQ_LEN, calibration_windows, find_decoder_layers
from slimlm.compress.gptq import DEFAULT_ACT_ORDER, DEFAULT_DAMP, HessianHooks, decoder_linears, gptq_quantize
from slimlm.compress.gptq_experts import ExpertHessianHooks, expert_modules, expert_slices
from slimlm.errors import SlimlmError
from slimlm.progress import progress_bar


def _to_hf_layout(transform, name: str, w_gguf: np.ndarray) -> np.ndarray:
    """Undo the export's layout change of a 2-D weight. It only permutes rows and scales them by a
    constant (rotary order, folded query scale), so it is the matrix T = transform(I) = c*P and
    its inverse is T^T / c^2."""
    rows = w_gguf.shape[0]
    T = transform(name, np.eye(rows, dtype=np.float32))
    c2 = float((T * T).sum(1)[0])
    return (T.T @ w_gguf) / c2


class _Stop(Exception):
    """Raised by the first layer's hook: the rest of the forward pass is not needed."""


def _capture_inputs(model, layers, windows, batch_size: int):
    """(hidden states entering layer 0 per batch, per layer the kwargs of its call per batch)."""
    import torch

    inputs: list = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def pre_hook(index):
        def hook(module, args, kw):
            kwargs[index].append(dict(kw))
            if index == 0:
                inputs.append(args[0] if args else kw.get("hidden_states"))
            if index == len(layers) - 1:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for at in range(0, len(windows), batch_size):
                try:
                    model(input_ids=windows[at:at + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    for kw in kwargs:
        for call in kw:
            call.pop("hidden_states", None)
    return inputs, kwargs


def block_coder(fmt, damp: float = DEFAULT_DAMP, act_order: bool = DEFAULT_ACT_ORDER):
    """sequential_gptq's coder for a block format (or a function of the width giving one):
    ((q, d, m), the dequantized weights)."""
    fmt_of = fmt if callable(fmt) else (lambda cols, f=get_format(fmt): f)

    def coder(name: str, w: np.ndarray, H: np.ndarray):
        f = fmt_of(w.shape[1])
        q, d, m = gptq_quantize(f, w, H, damp=damp, act_order=act_order)
        return (q, d, m), dequantize_codes(f, q, d, m)
    return coder


def _run_layer(layer, hidden, kw: dict):
    out = layer(hidden, **kw)
    return out[0] if isinstance(out, tuple) else out


def sequential_gptq(model, tokenizer, transform, fmt, texts: list[str], samples: int = CALIB_SAMPLES,
                    seq_len: int = CALIB_SEQ_LEN, damp: float = DEFAULT_DAMP, act_order: bool = DEFAULT_ACT_ORDER,
                    batch_size: int = 4, progress: bool = True, coder=None, expert_keys: dict | None = None) -> dict:
    """{HF weight name: (q, d, m)} for every decoder linear, codes in llama.cpp's layout (`transform`
    is gguf_export.layout_transform(folder)). `fmt` is a format, or a function of a layer's width
    returning one (per-channel groups). `coder(name, w, H) -> (what to keep, values read back)`
    replaces `fmt` where each weight has its own type (gptq_kquant.typed_coder: GGUF bytes). `model`
    is changed in place: its decoder linears end up holding their dequantized weights. With
    `expert_keys` (gptq_experts.checkpoint_keys) an MoE's routed experts are coded too, each from the
    tokens routed to it, under their checkpoint names."""
    import torch

    coder = coder or block_coder(fmt, damp, act_order)
    layers = find_decoder_layers(model)
    if layers is None:
        raise SlimlmError("the model has no decoder layer list: sequential GPTQ cannot walk it")
    prefix = next(n for n, m in model.named_modules() if m is layers)
    windows = calibration_windows(tokenizer, texts, samples, seq_len)
    model.eval()
    hidden, kwargs = _capture_inputs(model, layers, windows, batch_size)
    codes: dict = {}
    bar = progress_bar("GPTQ layer by layer", len(layers)) if progress else nullcontext(lambda n=1: None)
    with torch.no_grad(), bar as advance:
        for i, layer in enumerate(layers):
            linears = decoder_linears(layer, prefix=f"{prefix}.{i}.")
            experts = expert_modules(layer, prefix=f"{prefix}.{i}.") if expert_keys else {}
            hooks, expert_hooks = HessianHooks(linears), ExpertHessianHooks(experts)
            try:
                for b, x in enumerate(hidden):
                    _run_layer(layer, x, kwargs[i][b])
                    hooks.forget_input()
            finally:
                hessians = hooks.remove()
                expert_hessians = expert_hooks.remove(expert_keys or {})
            for name, linear in linears.items():
                key = name + ".weight"
                w = transform(key, linear.weight.detach().float().cpu().numpy())
                codes[key], values = coder(key, w, hessians[name].numpy())
                deq = _to_hf_layout(transform, key, values)
                linear.weight.copy_(torch.from_numpy(deq).to(linear.weight.dtype))
            for module in experts.values():
                _code_experts(module, i, expert_keys, expert_hessians, transform, coder, codes)
            del hessians, expert_hessians
            hidden = [_run_layer(layer, x, kwargs[i][b]) for b, x in enumerate(hidden)]
            gc.collect()
            advance()
    return codes


def _code_experts(module, layer: int, keys: dict, hessians: dict, transform, coder, codes: dict) -> None:
    """Code each routed expert's gate, up and down projections (slices of the fused parameters) with
    its own Hessian, and leave their dequantized values in the module for the next layer's inputs.
    An expert that no calibration token reached has no Hessian: the writer rounds it to nearest."""
    import torch

    for key, view in expert_slices(module, layer, keys):
        if key not in hessians:
            continue
        name = key + ".weight"
        w = transform(name, view.float().cpu().numpy())
        codes[name], values = coder(name, w, hessians[key].numpy())
        view.copy_(torch.from_numpy(_to_hf_layout(transform, name, values)).to(view.dtype))
