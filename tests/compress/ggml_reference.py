"""llama.cpp's own quantizer as the reference for slimlm's K-quant encoders: ggml's public
`ggml_quantize_chunk` (the `quantize_row_*_ref` functions without an importance matrix, the
`*_impl` ones with one) from the libggml that llama-cpp-python ships. llama-cpp-python is a
required dependency, so a missing library is a failure here, never a skip."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
from gguf import GGMLQuantizationType


def ggml_quantize(w: np.ndarray, qtype: GGMLQuantizationType, block_bytes: int, imatrix=None,
                  block: int = 256) -> np.ndarray:
    """llama.cpp's bytes of type `qtype` for w (rows of a multiple of `block` weights), one row each;
    with `imatrix` (one importance value per column) what llama-quantize --imatrix writes."""
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    assert libs, f"llama-cpp-python at {Path(llama_cpp.__file__).parent} ships no libggml-base: rebuild it (make llama-cpp)"
    fn = ctypes.CDLL(str(libs[0])).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    w = np.ascontiguousarray(w, dtype=np.float32)
    out = np.zeros((w.shape[0], w.shape[1] // block * block_bytes), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = fn(int(qtype), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1],
                 None if qw is None else qw.ctypes.data)
    assert written == out.size
    return out
