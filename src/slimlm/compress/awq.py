"""AWQ (Lin et al. 2023): activation-aware scaling that makes a model quantize better in a block format.

A few input channels of a transformer's linears carry activations far larger than the rest
(outliers). Round-to-nearest in a block format spends the same precision on every column, so the
weights that meet those large activations are coded as coarsely as the others and their error is
amplified by the activation. AWQ multiplies the weight *columns* of such channels by a scale s > 1
(so they are coded relatively more finely) and divides whatever produces the channel by s, which
leaves the full-precision model exactly equivalent:

    norm(x) * w  ->  q/k/v_proj      w' = w / s,  W' = W * s  (columns)
    norm(x) * (1 + w)  (Gemma)       w' = (1 + w) / s - 1
    up_proj rows -> down_proj cols   up' = up / s (rows and bias),  down' = down * s

For each such group s = mean(|x|)^alpha per input channel (x: the group's calibration inputs),
normalised by sqrt(max(s) * min(s)) as the reference implementation does, with alpha on a grid in
[0, 1); for each alpha the group's linears are scaled, round-to-nearest quantized in the target
format with llama.cpp's own rule (`blocks.rtn`), dequantized and unscaled, and the output error
sum over the group's linears of ||X W^T - X Wq^T||^2 on the captured inputs is measured. The best
alpha is kept; alpha = 0 is s = 1, plain RTN, so on the calibration inputs AWQ is never worse than
RTN. (This version searches scales only; the reference's weight-clipping search is not done.)

The inputs come from one pass of the full-precision model over calibration text: the
*non-sequential* variant (every layer sees full-precision inputs, not the outputs of already
scaled/quantized layers). Per group at most `max_tokens` evenly spaced token rows are kept for the
error; mean |x| uses every token.

Which groups are scaled is decided per decoder layer from its modules: attention needs
q/k/v_proj (or phi3's fused qkv_proj) right after `input_layernorm`; the MLP needs gate/up_proj
(or fused gate_up_proj) after `pre_feedforward_layernorm` (Gemma 2/3) or
`post_attention_layernorm`; up -> down needs separate up_proj and down_proj. The norm must really
feed those linears (checked on the calibration pass: the norm's output is the very tensor the
linears get) and must scale its output per channel as x*w or x*(1+w) (checked by probing it).
An MoE block (fused routed experts after the norm, a router, maybe a shared expert) is scaled by
awq_experts.py, each expert judged on the tokens routed to it. Anything else (MLA attention,
v -> o which GQA shapes prevent) is left alone and listed in the report's "skipped". At the end
the transformed model's logits are compared with the original's on a calibration window, and a
mismatch is an error, never a silently changed model.

`apply_awq` writes a Hugging Face folder; quantizing that folder with RTN gives AWQ-in-GGUF.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from slimlm.compress.blocks import BlockFormat, dequantize_codes, get_format, rtn
from slimlm.compress.calibration import (
    CALIB_SAMPLES,
    CALIB_SEQ_LEN,
    calibration_model,
    calibration_windows,
    find_decoder_layers,
    run_calibration,
)
from slimlm.errors import SlimlmError

__all__ = ["apply_awq", "search_scale"]

_WEIGHT_FILES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".safetensors.index.json", ".bin.index.json")


# --- the structure: which linears follow which op -------------------------------------------

def _linear(parent, name):
    from torch import nn

    m = getattr(parent, name, None) if parent is not None else None
    return m if isinstance(m, nn.Linear) else None


def _norm_kind(norm) -> str | None:
    """'mul' if norm(x) = n(x) * w, '1p' if n(x) * (1 + w), None otherwise (probed, weight restored)."""
    import torch

    w = getattr(norm, "weight", None)
    if w is None or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, w.numel(), generator=g).to(w.device, w.dtype)
    s = (torch.rand(w.numel(), generator=g) + 0.5).to(w.device, w.dtype)
    orig = w.detach().clone()
    try:
        with torch.no_grad():
            y = norm(x) / s
            for kind, new in (("mul", orig / s), ("1p", (1 + orig) / s - 1)):
                w.copy_(new)
                if torch.allclose(norm(x), y, rtol=1e-4, atol=1e-5 * float(y.abs().max()) + 1e-7):
                    return kind
                w.copy_(orig)
    finally:
        with torch.no_grad():
            w.copy_(orig)
    return None


class _Group:
    def __init__(self, layer: int, kind: str, prev_name: str, prev, prev_kind: str, names, linears):
        self.layer, self.kind, self.prev_name, self.prev, self.prev_kind = layer, kind, prev_name, prev, prev_kind
        self.names, self.linears = list(names), list(linears)
        self.abs_sum = None
        self.count = 0
        self.rows: list = []
        self.wired: bool | None = None  # does prev's output reach the linears unchanged?

    def label(self) -> str:
        return f"layer {self.layer} {self.kind}: {self.prev_name} -> {', '.join(self.names)}"


def _find_groups(model, layers, skipped: list, blocks: list) -> list[_Group]:
    """The dense groups to scale; an MoE layer's block goes to `blocks` (awq_experts.ExpertBlock)."""
    from slimlm.compress.awq_experts import find_expert_block

    groups = []
    prefix = next((n for n, m in model.named_modules() if m is layers), "layers")
    for i, layer in enumerate(layers):
        base = f"{prefix}.{i}"
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)

        def add(kind, norm_name, sub, sub_name, names, why_missing):
            norm = getattr(layer, norm_name, None) if norm_name else None
            lins = [_linear(sub, n) for n in names]
            if norm is None or not all(lins):
                skipped.append({"layer": i, "group": kind, "why": why_missing})
                return
            nk = _norm_kind(norm)
            if nk is None:
                skipped.append({"layer": i, "group": kind,
                                "why": f"{norm_name} ({type(norm).__name__}) does not scale per channel as x*w or x*(1+w)"})
                return
            groups.append(_Group(i, kind, f"{base}.{norm_name}", norm, nk,
                                 [f"{base}.{sub_name}.{n}" for n in names], lins))

        if _linear(attn, "q_proj") is not None:
            add("attn", "input_layernorm", attn, "self_attn", ["q_proj", "k_proj", "v_proj"],
                "no input_layernorm -> q/k/v_proj layout")
        elif _linear(attn, "qkv_proj") is not None:
            add("attn", "input_layernorm", attn, "self_attn", ["qkv_proj"], "no input_layernorm -> qkv_proj layout")
        else:
            skipped.append({"layer": i, "group": "attn",
                            "why": f"attention {type(attn).__name__} has no q/k/v_proj (e.g. MLA or none)"})
        mlp_norm = ("pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm")
                    else "post_attention_layernorm")
        block = None  # an MoE layer's block (awq_experts.ExpertBlock)
        if _linear(mlp, "gate_proj") is not None and _linear(mlp, "up_proj") is not None:
            add("mlp", mlp_norm, mlp, "mlp", ["gate_proj", "up_proj"], f"no {mlp_norm} -> gate/up_proj layout")
        elif _linear(mlp, "gate_up_proj") is not None:
            add("mlp", mlp_norm, mlp, "mlp", ["gate_up_proj"], f"no {mlp_norm} -> gate_up_proj layout")
        else:
            found = find_expert_block(i, base, layer, mlp, mlp_norm, _norm_kind)
            if isinstance(found, str):
                skipped.append({"layer": i, "group": "mlp", "why": found})
            else:
                block = found
                blocks.append(block)  # its down projections are scaled expert by expert
        up, down = _linear(mlp, "up_proj"), _linear(mlp, "down_proj")
        if up is not None and down is not None and _linear(mlp, "gate_proj") is not None \
                and down.in_features == up.out_features:
            groups.append(_Group(i, "down", f"{base}.mlp.up_proj", up, "rows", [f"{base}.mlp.down_proj"], [down]))
        elif block is None:
            skipped.append({"layer": i, "group": "down",
                            "why": "no separate gate_proj/up_proj -> down_proj (fused or MoE MLP)"})
        skipped.append({"layer": i, "group": "v->o", "why": "not scaled (grouped-query shapes)"})
    return groups


# --- calibration ------------------------------------------------------------------------------

def _capture(model, windows, groups: list[_Group], max_tokens: int, batch_size: int, progress: bool,
             blocks: list = ()):
    stride = max(1, math.ceil(windows.numel() / max_tokens))
    outputs: dict[int, object] = {}
    handles = [h for b in blocks for h in b.hooks(stride)]

    def forget() -> None:
        outputs.clear()
        for b in blocks:
            b.forget()

    def prev_hook(key):
        def hook(module, args, output):
            outputs[key] = output
        return hook

    def input_hook(g: _Group, key):
        def hook(module, args, output):
            x = args[0]
            if g.wired is None:
                g.wired = key is None or outputs.get(key) is x
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            a = xf.abs().sum(0).double()
            g.abs_sum = a if g.abs_sum is None else g.abs_sum + a
            g.count += xf.shape[0]
            g.rows.append(xf[::stride].cpu())
        return hook

    for gi, g in enumerate(groups):
        key = None
        if g.prev_kind != "rows":
            key = gi
            handles.append(g.prev.register_forward_hook(prev_hook(key)))
        handles.append(g.linears[0].register_forward_hook(input_hook(g, key)))
    try:
        run_calibration(model, windows, batch_size, "calibrating (AWQ activations)", progress,
                        after_batch=forget)
    finally:
        for h in handles:
            h.remove()


# --- the scale search -------------------------------------------------------------------------

def _quant_error(fmt: BlockFormat, pairs, s) -> float:
    import torch

    err = 0.0
    for X, W in pairs:
        ws = (W * s[None, :]).cpu().numpy()
        wq = torch.from_numpy(dequantize_codes(fmt, *rtn(fmt, ws))).to(W.device) / s[None, :]
        err += float((X @ (W - wq).T).double().pow(2).sum())
    return err


def search_scale(fmt: str | BlockFormat, X, x_mean, weights, grid: int = 20, pairs=None):
    """The AWQ scale for linears `weights` ([out, in] each) sharing inputs X [n, in] with per-channel
    mean |x| `x_mean` [in]: returns (s, alpha, error with s, error of plain RTN). alpha = 0 (s = 1)
    is always tried first and kept on ties, so the error never exceeds RTN's. `pairs` [(X_i, W_i)]
    instead: each linear with its own inputs (an MoE's experts, awq_experts.py)."""
    import torch

    fmt = get_format(fmt)
    pairs = pairs if pairs is not None else [(X, W) for W in weights]
    if grid < 1:
        raise SlimlmError(f"the AWQ grid needs at least one point, got {grid}")
    x_mean = x_mean.float().clamp(min=1e-8)
    ones = torch.ones_like(x_mean)
    best = (ones, 0.0, _quant_error(fmt, pairs, ones))
    base = best[2]
    for k in range(1, grid):
        alpha = k / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        err = _quant_error(fmt, pairs, s)
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], best[2], base


def _fold_norm(norm, kind: str, s) -> None:
    """Divide the norm's output by s per channel (kind 'mul': x*w, '1p': x*(1+w))."""
    import torch

    with torch.no_grad():
        w = norm.weight
        if kind == "mul":
            w.div_(s.to(w.dtype))
        else:
            w.copy_((1 + w) / s.to(w.dtype) - 1)


def _apply_scale(g: _Group, s) -> None:
    import torch

    with torch.no_grad():
        for lin in g.linears:
            lin.weight.mul_(s[None, :].to(lin.weight.dtype))
        w = g.prev.weight
        if g.prev_kind in ("mul", "1p"):
            _fold_norm(g.prev, g.prev_kind, s)
        else:  # up_proj: its output rows feed down_proj's input columns
            w.div_(s[:, None].to(w.dtype))
            if g.prev.bias is not None:
                g.prev.bias.div_(s.to(w.dtype))


# --- the verb ---------------------------------------------------------------------------------

def apply_awq(folder: str | Path, out: str | Path, fmt: str | BlockFormat,
              calib_texts: list[str] | None = None, samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN,
              grid: int = 20,
              max_tokens: int = 4096, force: bool = False, progress: bool = False, batch_size: int = 4) -> dict:
    """AWQ-scale the Hugging Face model in `folder` for block format `fmt` and save it to `out`
    (a Hugging Face folder, fp32, written atomically; tokenizer files copied from `folder`).
    The fp32 model's outputs are unchanged. calib_texts defaults to the default calibration set
    (data.DEFAULT_CALIB, `mix`). Returns a report: per scaled group its layer,
    kind (attn/mlp/down), linears, alpha, and calibration errors with AWQ and with plain RTN;
    "skipped" lists what was left alone and why."""
    from slimlm.models.loading import atomic_dir

    fmt = get_format(fmt)
    folder, out = Path(folder), Path(out)
    if out.exists() and not force:
        raise SlimlmError(f"{out} already exists: choose another output path or pass --force")
    start = time.perf_counter()
    with calibration_model(folder, calib_texts) as (model, tokenizer, texts):
        windows = calibration_windows(tokenizer, texts, samples, seq_len)  # raises on too little text
        report = _scale(model.eval(), fmt, windows, seq_len, grid, max_tokens, progress, batch_size)
        with atomic_dir(out, force=force) as tmp:
            model.save_pretrained(tmp)
            for f in folder.iterdir():
                if f.is_file() and not f.name.endswith(_WEIGHT_FILES) and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
    report["seconds"] = time.perf_counter() - start
    return report


def _scale(model, fmt: BlockFormat, windows, seq_len: int, grid: int, max_tokens: int, progress: bool,
           batch_size: int) -> dict:
    """apply_awq's work on the loaded fp32 model, in place: find the groups, search and fold the
    scales, and check that the logits did not move. Returns the report."""
    import torch

    device = next(model.parameters()).device
    report: dict = {"format": fmt.name, "model_type": getattr(model.config, "model_type", None),
                    "variant": "non-sequential (full-precision inputs)", "scaled": [], "skipped": []}
    probe = windows[:1, :min(seq_len, 64)].to(device)
    with torch.no_grad():
        before = model(input_ids=probe, use_cache=False).logits.float()
    layers = find_decoder_layers(model)
    groups: list[_Group] = []
    blocks: list = []  # awq_experts.ExpertBlock, one per MoE layer
    if layers is None:
        report["skipped"].append({"layer": None, "group": "all", "why": "no decoder layers found"})
    else:
        groups = _find_groups(model, layers, report["skipped"], blocks)
    if groups or blocks:
        _capture(model, windows, groups, max_tokens, batch_size, progress, blocks)
    for g in groups:
        width = g.linears[0].in_features
        if g.count == 0 or not g.wired:
            why = "never called on calibration" if g.count == 0 else \
                  f"{g.prev_name}'s output is not what the linears receive"
            report["skipped"].append({"layer": g.layer, "group": g.kind, "why": why})
            continue
        if width % fmt.block_size:
            report["skipped"].append({"layer": g.layer, "group": g.kind,
                                      "why": f"width {width} not a multiple of {fmt.name}'s block size"})
            continue
        X = torch.cat(g.rows).to(device)
        x_mean = (g.abs_sum / g.count).float().to(device)
        weights = [lin.weight.detach().float() for lin in g.linears]
        s, alpha, err, err_rtn = search_scale(fmt, X, x_mean, weights, grid=grid)
        if alpha > 0:
            _apply_scale(g, s)
        report["scaled"].append({"layer": g.layer, "group": g.kind, "prev": g.prev_name, "linears": g.names,
                                 "alpha": alpha, "error": err, "error_rtn": err_rtn})
        g.rows = []
        del X
    for b in blocks:
        width = b.experts.gate_up_proj.shape[2]
        why = ("never called on calibration" if b.count == 0 else
               f"{b.norm_name}'s output is not what the MoE block receives" if not b.wired else
               f"width {width} not a multiple of {fmt.name}'s block size" if width % fmt.block_size else None)
        if why:
            report["skipped"].append({"layer": b.layer, "group": "experts", "why": why})
        else:
            report["scaled"] += b.scale(fmt, grid, search_scale, _fold_norm)
    with torch.no_grad():
        after = model(input_ids=probe, use_cache=False).logits.float()
    diff = float((after - before).abs().max())
    report["max_logit_diff"] = diff
    if not torch.isfinite(after).all() or diff > 1e-3 * max(1.0, float(before.abs().max())):
        raise SlimlmError(f"AWQ changed the full-precision model's logits (max difference {diff:.3g}): "
                          f"the {report['model_type']} layout is not what AWQ assumed")
    return report
