"""GPTQ (Frantar et al. 2022) that chooses codes and scales inside a llama.cpp block format.

GPTQ quantizes a linear layer's weight one input column at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the layer's input Hessian
H = 2/N * sum x x^T, so the layer's *output* (W x) moves as little as possible on calibration
inputs. Here the result must be a llama.cpp block type (Q4_0, Q4_1, Q8_0, ...): blocks run along
input columns, so at the start of each block of `block_size` columns the block's scale (and min,
for the _1 types) is chosen with llama.cpp's own rule (`blocks.rtn`) from the *current*,
error-updated weights of that block, and its columns are then coded with that scale. The codes
are computed exactly as `blocks.rtn` computes them from a scale (so with no correlation between
inputs, H diagonal, GPTQ returns RTN's codes and scales bit for bit); the error that is
propagated uses the scale and min rounded to fp16, i.e. the values the file stores.

The Hessians come from one pass of the full-precision model over calibration text: this is the
*non-sequential* variant (every layer sees full-precision inputs, not the outputs of already
quantized layers), which needs only one forward pass and no per-layer re-run.

Because H depends only on a layer's inputs, and GPTQ groups along input columns, the algorithm can
run on the tensor exactly as llama.cpp lays it out (rows of q/k permuted for rotary, gemma's q
scaled by a constant): row permutations and row scalings leave H, and the column blocks, as they
are. The `gptq` quantization method (quant_methods/gptq.py) drives this module for quantize().

Out of domain (issue 16). Calibrated on python-docs alone, GPTQ fitted its calibration domain: on
SmolLM2-135M-Instruct, the output error tr(dW H dW^T) of its Q4_0 codes, relative to
round-to-nearest's, measured with the Hessian H of held-out text of each corpus (geometric mean
over q/o/gate/down_proj of layers 1, 10, 20, 28; data/calibration_mix.py's held-out corpora):

==========================  =======  ========  ===========  ======  ====  ==========================
calibration                 damp     act-order  python-docs  prose   chat  worst layer on prose
==========================  =======  ========  ===========  ======  ====  ==========================
python-docs, 32 x 256        0.01     no        0.352        0.681   0.518  1.100 (worse than RTN)
python-docs, 32 x 256        0.1      no        0.360        0.638   0.508  0.910
python-docs, 32 x 256        0.01     yes       0.287        0.583   0.441  1.161
python-docs, 128 x 256       0.01     no        0.318        0.629   0.458  0.910
python-docs, 128 x 256       0.01     yes       0.252        0.525   0.384  0.923
mix, 32 x 256                0.01     no        0.438        0.524   0.436  0.982
mix, 32 x 256                0.01     yes       0.366        0.438   0.364  0.999
mix, 128 x 256               0.01     no        0.393        0.491   0.401  0.821
mix, 128 x 256               0.1      no        0.408        0.501   0.417  0.776
mix, 128 x 256               0.01     yes       0.322        0.403   0.329  0.811
==========================  =======  ========  ===========  ======  ====  ==========================

(python-docs calibration also contains most of its own held-out text: its 'compound' topic quotes
the held-out 'while' and 'with' statements, so its in-domain column is partly in-sample.)

Whole model, the same SmolLM2 Q4_0 files at equal size (87.5 MiB: `--embeddings auto`, Q6_K
output), mean KL against the fp32 model on torch over 512-token chunks of each held-out corpus
(python-docs 1,022 tokens, prose 1,533, chat 1,533 with its ChatML markers as special tokens):

=========================================  ===========  =====  =====
file                                       python-docs  prose  chat
=========================================  ===========  =====  =====
RTN                                        0.292        0.292  0.235
GPTQ, python-docs 32 x 256 (old defaults)  0.144        0.229  0.164
GPTQ, mix 32 x 256, act-order off          0.190        0.239  0.192
GPTQ, mix 128 x 256, act-order (new)       0.097        0.117  0.087
=========================================  ===========  =====  =====

So at equal size the old GPTQ did not lose to RTN on these corpora, but its gain shrank from 0.49x
of RTN's KL in domain to 0.78x on prose. What closes the gap is act-order with 4x the tokens
(prose 0.229 -> 0.117, chat 0.164 -> 0.087, and in domain too). The calibration text alone, at
8,192 tokens without act-order, did not help the whole model (mix 0.239 vs python-docs 0.229 on
prose) even though the per-layer error above says it should: with that few tokens a diverse set
is a thinner sample of each kind. What is not separated here (each whole-model GPTQ file took
4-14 minutes on the shared 2 cores): act-order with python-docs at 128 x 256. The cost: the
defaults took 830 s to quantize SmolLM2 against 251 s for the old ones (4x the calibration
forward passes, layer by layer). The new defaults: act-order on (DEFAULT_ACT_ORDER), damping 0.01
(DEFAULT_DAMP), 128 x 256 tokens (calibration.CALIB_SAMPLES) of `mix` (data.DEFAULT_CALIB); the
last two take effect once quantize()'s literal defaults (32, "python-docs") name them.
"""

from __future__ import annotations

import numpy as np

from slimlm.compress.blocks import BlockFormat, get_format, roundf, rtn, safe_inverse
from slimlm.compress.blocks_imatrix import WEIGHTED_BLOCK_TYPES, block_codes_weighted, row_sigma2
from slimlm.compress.calibration import CALIB_SAMPLES, CALIB_SEQ_LEN, calibration_windows, run_calibration
from slimlm.errors import SlimlmError

__all__ = ["collect_hessians", "gptq_quantize", "gptq_columns", "BlockGrid", "HessianHooks", "decoder_linears",
           "inverse_cholesky", "DEFAULT_DAMP", "DEFAULT_ACT_ORDER"]

DEFAULT_DAMP = 0.01  # of mean(diag H), added to H's diagonal
DEFAULT_ACT_ORDER = True  # columns by decreasing diag(H), block scales from the original weights
# Scales chosen by llama-quantize's importance-matrix rules with diag(H) as the importance (what an
# imatrix is) instead of its reference rules: blocks_imatrix.py, kquants_imatrix.py. On SmolLM2's
# layers this took GPTQ's output error from 1.1-1.4x to 0.8-1.0x llama.cpp's imatrix files'.
DEFAULT_WEIGHTED = True


# --- Hessians --------------------------------------------------------------------------------

class HessianHooks:
    """Forward hooks accumulating H = 2/N * sum x x^T (float64, on the CPU) of the inputs x of the
    given nn.Linear modules, keyed by module name. Linears fed the very same input tensor (q/k/v,
    gate/up) share one H object, computed once."""

    def __init__(self, linears: dict):
        self.sums: dict = {}
        self.counts: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._last: list = [None, None]  # (input tensor, key) of the latest hook call
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0]
            if self._last[0] is x:  # same input as the previous linear: share its H
                self.alias[name] = self._last[1]
                return
            xf = x.detach().reshape(-1, x.shape[-1]).float()
            xx = (xf.T @ xf).double().cpu()
            self.sums[name] = self.sums[name] + xx if name in self.sums else xx
            self.counts[name] = self.counts.get(name, 0) + xf.shape[0]
            self._last[0], self._last[1] = x, name
        return hook

    def forget_input(self) -> None:
        """Call between batches: a new batch's tensor may reuse a freed one's id."""
        self._last[:] = [None, None]

    def remove(self) -> dict:
        """Unhook and return {name: H}."""
        for h in self._handles:
            h.remove()
        out = {name: h.mul_(2.0 / max(self.counts[name], 1)) for name, h in self.sums.items()}
        for name, key in self.alias.items():
            out.setdefault(name, out[key])
        return out


def decoder_linears(module, prefix: str = "") -> dict:
    """{name: nn.Linear} inside the decoder layers (module names containing ".layers.")."""
    from torch import nn

    return {prefix + n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)
            and ".layers." in prefix + n}


def collect_hessians(model, tokenizer, texts: list[str], samples: int = CALIB_SAMPLES, seq_len: int = CALIB_SEQ_LEN,
                     progress: bool = True, batch_size: int = 4, expert_keys: dict | None = None) -> dict:
    """H = 2/N * sum x x^T of the inputs of every nn.Linear inside the decoder layers, keyed by
    module name (the HF weight name without ".weight"). Up to `samples` windows of `seq_len`
    tokens are taken, evenly spread, from the concatenated `texts`, and run once through `model`
    (full precision: the non-sequential variant). With `expert_keys` (gptq_experts.checkpoint_keys)
    an MoE's routed experts get theirs too, each from the tokens routed to it, keyed by checkpoint name."""
    from slimlm.compress.gptq_experts import ExpertHessianHooks, expert_modules

    windows = calibration_windows(tokenizer, texts, samples, seq_len)
    linears = decoder_linears(model)
    if not linears:
        raise SlimlmError("the model has no linear layers inside decoder layers ('.layers.' in their "
                          "names): GPTQ cannot calibrate it")
    hooks = HessianHooks(linears)
    experts = ExpertHessianHooks(expert_modules(model) if expert_keys else {})
    was_training = model.training
    model.eval()
    try:
        run_calibration(model, windows, batch_size, "calibrating (GPTQ Hessians)", progress,
                        after_batch=hooks.forget_input)
    finally:
        hessians = hooks.remove()
        hessians.update(experts.remove(expert_keys or {}))
        model.train(was_training)
    return hessians


# --- the GPTQ step in a block format ---------------------------------------------------------

def _codes(fmt: BlockFormat, x: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Codes for float32 x (rows,) given per-row d (and m): the same arithmetic as blocks.rtn."""
    inv = safe_inverse(d)
    if fmt.rtn_rule == "absmax":
        q = roundf(x * inv) + fmt.zero
    elif fmt.rtn_rule == "signed_max":
        q = np.floor(x * inv + np.float32(fmt.zero + 0.5))
    else:
        q = np.floor((x - m) * inv + np.float32(0.5))
    return np.clip(q, fmt.qmin, fmt.qmax)


def _dequant(fmt: BlockFormat, q: np.ndarray, d16: np.ndarray, m16: np.ndarray | None) -> np.ndarray:
    x = d16 * (q.astype(np.float32) - np.float32(fmt.zero))
    return x if m16 is None else x + m16


def _f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


def inverse_cholesky(H: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of inv(H + damp*mean(diag H)*I), inv = U^T U."""
    H = H + np.eye(H.shape[0]) * (damp * float(np.mean(np.diag(H))))
    for extra in (0.0, 0.1, 1.0):
        try:
            if extra:
                H = H + np.eye(H.shape[0]) * (extra * float(np.mean(np.diag(H))))
            L = np.linalg.cholesky(H)
            Linv = np.linalg.solve(L, np.eye(H.shape[0]))  # inv(H) = Linv^T Linv
            return np.linalg.cholesky(Linv.T @ Linv).T
        except np.linalg.LinAlgError:
            continue
    raise SlimlmError("the calibration Hessian is not positive definite even after damping: "
                      "use more calibration samples or a larger damp")


def hessian_importance(H: np.ndarray, cols: int, weighted: bool) -> np.ndarray | None:
    """diag(H) as float32, the importance matrix GPTQ's weighted scale rules take; None when not
    weighted or when H is not [cols, cols] (gptq_columns then says what is wrong with it)."""
    H = np.asarray(H)
    return np.diag(H).astype(np.float32) if weighted and H.shape == (cols, cols) else None


class BlockGrid:
    """The quantization grid of a 32-block llama.cpp format for gptq_columns: `fit` chooses blocks'
    scales (and mins) with llama.cpp's rule (`blocks.rtn`; with `importance`, one value per column,
    the importance-matrix rule of blocks_imatrix where the format has one, sigma2 from the whole
    original rows as llama.cpp computes it), `code` rounds one column on them."""

    def __init__(self, fmt: BlockFormat, rows: int, cols: int, importance: np.ndarray | None = None,
                 sigma2: np.ndarray | None = None):
        self.fmt, self.block = fmt, fmt.block_size
        self.importance = importance if fmt.name in WEIGHTED_BLOCK_TYPES else None
        self.sigma2 = sigma2
        self.Q = np.zeros((rows, cols), dtype=np.int16)
        self.D = np.zeros((rows, cols // self.block), dtype=np.float32)
        self.M = None if fmt.symmetric else np.zeros_like(self.D)

    def fit(self, start: int, w: np.ndarray) -> None:
        """Scales of the blocks of columns start..start+w.shape[1] from float32 weights w."""
        if self.importance is None:
            _, d, m = rtn(self.fmt, w)
        else:
            _, d, m = block_codes_weighted(self.fmt.name, w, self.importance[start:start + w.shape[1]], self.sigma2)
        g = start // self.block
        self.D[:, g:g + d.shape[1]] = d
        if self.M is not None:
            self.M[:, g:g + d.shape[1]] = m

    def code(self, col: int, x: np.ndarray) -> np.ndarray:
        """Code column `col` (float32 x) on its block's scale; returns the value the file stores."""
        g = col // self.block
        d, m = self.D[:, g], None if self.M is None else self.M[:, g]
        q = _codes(self.fmt, x, d, m)
        self.Q[:, col] = q
        return _dequant(self.fmt, q, _f16(d), None if m is None else _f16(m))

    def result(self):
        return self.Q.astype(np.uint8 if self.fmt.qmax > 127 else np.int8), self.D, self.M


def gptq_columns(grid, w: np.ndarray, H: np.ndarray, damp: float = DEFAULT_DAMP,
                 act_order: bool = DEFAULT_ACT_ORDER, batch: int = 128) -> None:
    """GPTQ's column loop over w [rows, cols] with input Hessian H, coding on `grid` (BlockGrid, or
    gptq_kquant's super-block grids): `grid.block` columns share scales; `grid.fit(start, w32)`
    chooses the scales of the blocks that float32 weights w32 starting at column `start` cover;
    `grid.code(col, x32)` codes one column and returns its stored (dequantized) values. Without
    act_order, each block is fitted on the error-updated weights when its first column comes up;
    with it, every block is fitted up front on the original weights (static groups) and columns
    go in order of decreasing diag(H)."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise SlimlmError(f"GPTQ quantizes 2-D weights [rows, cols], got shape {w.shape}")
    rows, cols = w.shape
    H = np.asarray(H, dtype=np.float64)
    if H.shape != (cols, cols):
        raise SlimlmError(f"the Hessian has shape {H.shape}, expected ({cols}, {cols}) for weights {w.shape}")
    if not np.isfinite(H).all():
        raise SlimlmError("the calibration Hessian holds NaN or inf: the model overflowed on the calibration text")
    bs = grid.block
    W = w.astype(np.float64).copy()
    H = H.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    perm = np.arange(cols)
    if act_order:
        grid.fit(0, W.astype(np.float32))  # static groups from the original weights
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[np.ix_(perm, perm)]
    U = inverse_cholesky(H, damp)

    batch = max(bs, batch // bs * bs)
    for i1 in range(0, cols, batch):
        i2 = min(i1 + batch, cols)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i]
            if not act_order and col % bs == 0:  # a new block: its scale from the current weights
                grid.fit(col, W1[:, i:i + bs].astype(np.float32))
            wq = grid.code(col, W1[:, i].astype(np.float32)).astype(np.float64)
            err = (W1[:, i] - wq) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]


def gptq_quantize(fmt: str | BlockFormat, w: np.ndarray, H: np.ndarray, damp: float = DEFAULT_DAMP,
                  act_order: bool = DEFAULT_ACT_ORDER, batch: int = 128, weighted: bool = DEFAULT_WEIGHTED):
    """GPTQ codes for w [rows, cols] with input Hessian H [cols, cols]: (q, d, m) as blocks.rtn
    returns them (q int8 codes, d float32 per row per block, m for the _1 types else None), ready
    for blocks.pack. Each block's d (m) is llama.cpp's rule applied to the error-updated weights at
    the start of that block. With act_order, columns are taken in order of decreasing diag(H) and
    the scales are fixed up front from the original weights (a block's columns are then no longer
    quantized together). `weighted`: each block's d (m) by llama-quantize's importance-matrix rule
    with diag(H) as the importance, where the format has one (not Q8_0, not the ternary types)."""
    fmt = get_format(fmt)
    w = np.asarray(w)
    if w.ndim == 2:
        rtn(fmt, w)  # validates w (float, finite, width a multiple of the block size)
    grid = None
    if w.ndim == 2:
        importance = hessian_importance(H, w.shape[1], weighted)
        grid = BlockGrid(fmt, *w.shape, importance=importance,
                         sigma2=None if importance is None else row_sigma2(w))
    gptq_columns(grid, w, H, damp=damp, act_order=act_order, batch=batch)
    return grid.result()
