"""Presets: every shipped one loads with every candidate checked; a bad one is a one-line error."""

from __future__ import annotations

import pytest

from slimlm.errors import SlimlmError
from slimlm.shrink import preset_names
from slimlm.shrink.candidates import CANDIDATE_KINDS
from slimlm.shrink.presets import load_preset


@pytest.mark.parametrize("name", ["quick", "standard", "thorough"])
def test_shipped_presets_load(name):
    assert name in preset_names()
    config, specs = load_preset(name)
    assert specs and all(s.kind in CANDIDATE_KINDS for s in specs)
    assert len({s.key() for s in specs}) == len(specs)
    # the hand-picked llama.cpp baseline is in every preset, so the report can compare against it
    assert any(s.method == "llamacpp" and s.format.endswith("Q4_K_M") for s in specs)


@pytest.mark.parametrize("text, expected", [
    ("candidates:\n  - {kind: quantize, method: rtn, format: gguf:Q4_0, bitz: 3}\n", "unknown key 'bitz'"),
    ("candidates:\n  - {kind: distill-everything}\n", "unknown candidate kind 'distill-everything'"),
    ("candidates:\n  - {kind: quantize, method: nope, format: gguf:Q4_0}\n", "unknown quantization method 'nope'"),
    ("candidates:\n  - {kind: prune, method: width}\n", "needs a ratio"),
    ("candidates:\n  - {kind: quantize, method: rtn, ratio: 0.2, format: gguf:Q4_0}\n", "takes no ratio"),
    ("candidates:\n  - {kind: quantize, method: rtn, format: gguf:Q4_0}\n"
     "  - {kind: quantize, method: rtn, format: gguf:Q4_0}\n", "listed twice"),
    ("limits: 3\ncandidates: []\n", "unknown key 'limits'"),
    ("candidates: []\n", "no candidates"),
])
def test_bad_presets_fail_in_one_line(tmp_path, text, expected):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(SlimlmError) as info:
        load_preset(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_unknown_preset_name():
    with pytest.raises(SlimlmError, match="not a shipped preset"):
        load_preset("extreme")
