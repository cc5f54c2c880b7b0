"""A GGUF file's tensors (name, type, shape, bytes) without parsing its metadata values.

Written here because gguf's GGUFReader turns every metadata value into numpy arrays first, a
tokenizer's 49,152 strings and 48,900 merges included: 2.9 s for SmolLM2's file on a 2-core Xeon,
paid on every quantization of a GGUF parent (source_blocks.py) and every GGUF load check
(loading.check_gguf), which only need the tensor table. This reader steps over the values (a
string array is still walked, its strings are not decoded) and maps the data section with numpy;
tests/models/test_gguf_tensors.py holds it against GGUFReader.

The layout is the GGUF specification's (ggml docs/gguf.md): magic, version, tensor count,
metadata count; each metadata key, value type and value; each tensor's name, dimensions (row
width first), type and offset in the data section, which starts at the next multiple of
`general.alignment` (32 if absent).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError

# GGUFValueType -> fixed size in bytes (8: string, 9: array are walked)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass
class GGUFTensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: row width first, as GGUFReader's `shape`
    data_offset: int  # in the file
    n_bytes: int
    data: np.ndarray  # read-only map: float types as their dtype, block types as uint8 rows of bytes


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8")

    def skip_value(self, kind: int) -> None:
        if kind in _FIXED:
            self.pos += _FIXED[kind]
        elif kind == _STRING:
            n = self.take("<Q")  # its length (read first: `pos += take()` would lose take's step)
            self.pos += n  # then that many bytes, not decoded
        elif kind == _ARRAY:
            item, count = self.take("<IQ")
            if item in _FIXED:
                self.pos += _FIXED[item] * count
            else:  # strings (a vocabulary) are walked one by one
                for _ in range(count):
                    self.skip_value(item)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")


def read_tensors(path: Path) -> list[GGUFTensor]:
    """The tensor table of the GGUF file at `path`, each tensor's bytes mapped, not read."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(raw))
    if bytes(raw[:4]) != b"GGUF":
        raise SlimlmError(f"{path} is not a readable GGUF file (no GGUF magic): re-copy or re-export it")
    cur.pos = 4
    version, n_tensors, n_kv = cur.take("<IQQ")
    if version not in (2, 3):
        raise SlimlmError(f"{path} is not a readable GGUF file (version {version}; versions 2 and 3 are read): "
                          "re-copy or re-export it")
    alignment = 32
    for _ in range(n_kv):
        key = cur.string()
        kind = cur.take("<I")
        if key == "general.alignment" and kind == _UINT32:
            alignment = cur.take("<I")
        else:
            cur.skip_value(kind)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos)
        cur.pos += 8 * n_dims
        kind, offset = cur.take("<IQ")
        infos.append((name, tuple(int(d) for d in dims), GGMLQuantizationType(kind), offset))
    start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, dims, qtype, offset in infos:
        block, size = GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(dims)) // block * size
        np_shape = tuple(reversed(dims))
        at = start + offset
        if at + n_bytes > raw.size:
            raise SlimlmError(f"{path} is truncated ({raw.size} of {at + n_bytes} bytes): re-copy or re-export it")
        chunk = raw[at:at + n_bytes]
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint16)
            data = chunk.view(dtype).reshape(np_shape)
        else:
            data = chunk.reshape(quant_shape_to_byte_shape(np_shape, qtype))
        tensors.append(GGUFTensor(name, qtype, dims, at, n_bytes, data))
    return tensors
