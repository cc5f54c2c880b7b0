"""Fixtures of the server tests (helpers to import are in serve_helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_engine(tiny_models):
    from slimlm.serve import Engine

    engine = Engine.open(str(tiny_models("llama")), "torch")
    yield engine
    engine.close()
