"""The fast GGUF tensor table (models/gguf_tensors.py) against gguf's own GGUFReader: the same
names, types, shapes, offsets and bytes, on a quantized built-in file and a float one; a file
cut short or without the magic is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from slimlm.errors import SlimlmError
from slimlm.models.gguf_tensors import read_tensors
from slimlm.models.reference import resolve


def _same_as_gguf(path):
    ours, theirs = read_tensors(path), GGUFReader(path).tensors
    assert [t.name for t in ours] == [t.name for t in theirs]
    for a, b in zip(ours, theirs):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(x) for x in b.shape)
        assert (a.data_offset, a.n_bytes) == (b.data_offset, b.n_bytes)
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data)


def test_a_quantized_built_in_file_reads_as_gguf_reads_it():
    _same_as_gguf(resolve("smollm2-135m-instruct").path)


def test_a_float_file_reads_as_gguf_reads_it(tiny_gguf):
    _same_as_gguf(tiny_gguf)


def test_a_cut_or_foreign_file_is_refused(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:-100])
    with pytest.raises(SlimlmError, match="truncated"):
        read_tensors(cut)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(SlimlmError, match="not a readable GGUF file .no GGUF magic"):
        read_tensors(foreign)
