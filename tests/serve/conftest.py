"""Fixtures of the server tests (helpers to import are in serve_helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_engine(tiny_models):
    from slimlm.serve import Engine

    engine = Engine.open(str(tiny_models("llama")), "torch")
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def llama_server_bin():
    """llama.cpp's own server, built from the same vendored llama.cpp and flags as the bindings
    (bench/llama_tools.py; `make test` builds it first, once per llama.cpp version and CPU)."""
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[2] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from llama_tools import SERVER, TOOLS, build

    return build((*TOOLS, SERVER)) / SERVER


@pytest.fixture
def llama_server(llama_server_bin, tiny_gguf):
    """A llama-server on loopback serving the tiny GGUF; yields its /v1 URL, stops it after."""
    import subprocess

    import httpx
    from serve_helpers import closed_port_url

    url = closed_port_url()
    port = url.split(":")[2].split("/")[0]
    proc = subprocess.Popen([str(llama_server_bin), "-m", str(tiny_gguf), "--host", "127.0.0.1", "--port", port,
                             "-c", "512", "-np", "2", "-t", "1", "--no-webui", "--alias", "tiny-engine"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        try:
            if httpx.get(url.removesuffix("/v1") + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "llama-server did not start in 60 s"
        time.sleep(0.1)
    yield SimpleProc(url, proc)
    proc.terminate()
    proc.wait(10)


class SimpleProc:
    def __init__(self, url, proc):
        self.url, self.proc = url, proc
