"""The main job's measuring step, on the real built-in model through llama.cpp."""

from __future__ import annotations

import llama_cpp  # noqa: F401 - a required dependency: its absence fails these tests, never skips them
import pytest

from slimlm.quickstart import PROMPTS, run_backend
from slimlm.runs import list_runs

pytestmark = [pytest.mark.real_model, pytest.mark.llamacpp]


def test_quickstart_row_is_measured_and_recorded():
    row = run_backend("llamacpp", max_tokens=8)
    assert len(row["answers"]) == len(PROMPTS) and all(row["answers"])
    assert row["decode_tps"] > 0 and row["ttft_ms"] > 0 and row["peak_mb"] > 0
    assert row["detail"].startswith("Q4_1")
    assert list_runs(limit=1)[0].command == "quickstart"
