"""Unstructured and N:M sparsity for the decoder's linear layers: Wanda and SparseGPT.

Both zero a fraction of each weight matrix and keep its shape. **This saves no time and no disk
on a CPU**: the file stores the zeros as ordinary dense numbers, and torch, llama.cpp and Ollama
multiply them like any other weight. Sparsity pays off only with sparse kernels (2:4 on NVIDIA
Ampere or newer via cuSPARSELt/TensorRT, or a sparse-aware runtime), or as a step before a
compressor that exploits zeros. The point here is to measure what a sparsity level costs in quality.

A pattern "N:M" keeps N weights of every M consecutive input weights of each row (2:4 is 50%
sparsity in the layout NVIDIA's sparse tensor cores run); otherwise `sparsity` is the fraction
zeroed, compared within each output row (Wanda's choice; SparseGPT within each column block).

Wanda (Sun et al. 2023): the score of weight W_ij is |W_ij| * ||X_j||_2, X_j being input channel
j over every calibration token; the lowest scores go, no weight is updated. Large activations make
a small weight matter, which magnitude pruning misses.

SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with the layer's input Hessian
H = 2/N X^T X, the same H and inverse-Cholesky factor GPTQ uses (imported from gptq.py): going
through the columns, the weights with the lowest w^2 / [H^-1]_jj^2 are zeroed (mask chosen per
block of 128 columns, or per group of M for N:M) and each zeroed weight's error is spread over
the columns not yet visited, so the layer's output on calibration inputs moves as little as
possible. Both use one full-precision calibration pass (the non-sequential variant, as GPTQ here).
"""

from __future__ import annotations

import numpy as np

from slimlm.compress.calibration import run_calibration
from slimlm.compress.gptq import inverse_cholesky
from slimlm.errors import SlimlmError

__all__ = ["parse_pattern", "wanda_scores", "prune_mask", "magnitude_prune", "sparsegpt_prune",
           "input_sq_norms", "sparsify", "decoder_linears", "inverse_factor", "check_pattern", "wanda_prune"]


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep 2 of every 4 consecutive input weights of a row."""
    if pattern is None:
        return None
    try:
        n, m = (int(v) for v in str(pattern).split(":"))
    except ValueError:
        n = m = 0
    if not 0 < n < m:
        raise SlimlmError(f"--pattern '{pattern}' is not N:M with 0 < N < M: use e.g. 2:4")
    return n, m


def wanda_scores(weight, sq_norm):
    """|W_ij| * ||X_j||_2 from the per-input-channel sum of squares sum_t x_tj^2."""
    return weight.abs() * sq_norm.to(weight.dtype).clamp_min(0).sqrt()[None, :]


def prune_mask(scores, sparsity: float | None = None, nm: tuple[int, int] | None = None):
    """Boolean mask of the weights to zero: the lowest scores of each row (`sparsity` of them), or
    the M - N lowest of every M consecutive columns."""
    import torch

    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        if cols % m:
            raise SlimlmError(f"a layer has {cols} inputs, not a multiple of {m}: the {n}:{m} pattern does not fit")
        groups = scores.reshape(rows, cols // m, m)
        low = torch.topk(groups, m - n, dim=-1, largest=False).indices
        return mask.reshape(rows, cols // m, m).scatter_(-1, low, True).reshape(rows, cols)
    k = int(cols * sparsity)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def magnitude_prune(weight, sparsity: float | None = None, nm: tuple[int, int] | None = None):
    """The baseline: zero the smallest |W| (per row, or per group of M)."""
    return weight.masked_fill(prune_mask(weight.abs(), sparsity, nm), 0)


def sparsegpt_prune(weight, H, sparsity: float | None = None, nm: tuple[int, int] | None = None,
                    block: int = 128, damp: float = 0.01, factor: np.ndarray | None = None):
    """SparseGPT on one weight [rows, cols] (a torch tensor) with input Hessian H [cols, cols];
    returns the pruned weight (same dtype). `factor`: inverse_factor(H, damp) if already computed
    (linears fed the same input share it). Float64 numpy, as GPTQ here: the column loop is many
    small operations, which numpy runs single-threaded and torch's thread pool only slows down."""
    import torch

    W = weight.detach().double().cpu().numpy().copy()
    H = np.array(H.numpy() if hasattr(H, "numpy") else H, dtype=np.float64)
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise SlimlmError(f"the Hessian has shape {tuple(H.shape)}, expected ({cols}, {cols})")
    if not np.isfinite(H).all():
        raise SlimlmError("the calibration Hessian holds NaN or inf: the model overflowed on the calibration text")
    if nm is not None and cols % nm[1]:
        raise SlimlmError(f"a layer has {cols} inputs, not a multiple of {nm[1]}: the {nm[0]}:{nm[1]} pattern does not fit")
    W[:, np.diag(H) == 0] = 0.0  # inputs that never fire
    U = factor if factor is not None else inverse_factor(H, damp)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].copy(), U[i1:i2, i1:i2]
        E1 = np.zeros_like(W1)
        diag = np.diag(U1)
        mask = np.zeros(W1.shape, dtype=bool)
        if nm is None:  # the block's lowest w^2 / [U]_jj^2, over all its rows at once
            k = int(W1.size * sparsity)
            if k:
                mask.reshape(-1)[np.argpartition((W1 ** 2 / diag[None, :] ** 2).reshape(-1), k - 1)[:k]] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # each row's M - N lowest of the next M columns
                sal = W1[:, i:i + nm[1]] ** 2 / diag[None, i:i + nm[1]] ** 2
                low = np.argpartition(sal, nm[1] - nm[0] - 1, axis=1)[:, :nm[1] - nm[0]]
                np.put_along_axis(mask[:, i:i + nm[1]], low, True, axis=1)
            w = W1[:, i]
            q = np.where(mask[:, i], 0.0, w)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            W1[:, i] = q
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return torch.from_numpy(W).to(weight.dtype)


def inverse_factor(H, damp: float = 0.01) -> np.ndarray:
    """Upper U with inv(H + damping) = U^T U (gptq's); row i of U spreads column i's error."""
    H = np.array(H.numpy() if hasattr(H, "numpy") else H, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    return inverse_cholesky(H, damp)


def decoder_linears(model) -> dict:
    from torch import nn

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    if not linears:
        raise SlimlmError("the model has no linear layers inside decoder layers ('.layers.' in their names): "
                          "nothing to sparsify")
    return linears


def input_sq_norms(model, windows, batch_size: int = 4, progress: bool = False) -> dict:
    """Per decoder linear: sum over calibration tokens of x_j^2 per input channel (float64)."""
    sums: dict = {}

    def make(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = (x * x).sum(0)
            sums[name] = s if name not in sums else sums[name] + s
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in decoder_linears(model).items()]
    try:
        run_calibration(model.eval(), windows, batch_size, "calibrating (Wanda norms)", progress)
    finally:
        for h in handles:
            h.remove()
    return sums


def check_pattern(model, nm: tuple[int, int] | None) -> None:
    """Refuse an N:M pattern that some decoder linear's input width does not divide (before any
    calibration)."""
    linears = decoder_linears(model)
    if nm is not None:
        bad = [n for n, m in linears.items() if m.in_features % nm[1]]
        if bad:
            raise SlimlmError(f"{bad[0]} has {linears[bad[0]].in_features} inputs, not a multiple of {nm[1]}: "
                              f"the {nm[0]}:{nm[1]} pattern does not fit this model")


def wanda_prune(weight, sq_norm, sparsity: float | None = None, nm: tuple[int, int] | None = None):
    """Wanda on one weight: zero the lowest |W| * ||X||, given the inputs' per-channel sum of squares."""
    return weight.masked_fill(prune_mask(wanda_scores(weight.float(), sq_norm), sparsity, nm), 0)


def sparsify(model, stats: dict, prune_weight, method: str, progress: bool = False) -> dict[str, float]:
    """Zero weights of every decoder linear in place: `prune_weight(weight, stat)` returns the new
    weight from the linear's calibration statistic `stats[name]` (what `method`, the name shown in
    progress and errors, collected). Returns the fraction of zeros per layer."""
    import torch

    from slimlm.progress import track

    linears = decoder_linears(model)
    report = {}
    items = track(linears.items(), f"{method} pruning", total=len(linears)) if progress else linears.items()
    with torch.no_grad():
        for name, module in items:
            w = module.weight
            if name not in stats:
                raise SlimlmError(f"{name} saw no calibration input: it cannot be pruned by {method}")
            w.copy_(prune_weight(w, stats[name]))
            report[name] = float((w == 0).double().mean())
    return report
