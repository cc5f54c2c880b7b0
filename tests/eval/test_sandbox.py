"""The sandbox that runs model-written code: each test runs a real child process."""

from __future__ import annotations

import os
import socket
import time

import pytest

from slimlm.eval.sandbox import network_namespace_works, run_many, run_program


def test_a_correct_program_passes():
    result = run_program("import math, re, typing, collections, hashlib, itertools\nassert math.gcd(12, 18) == 6\n")
    assert result.passed and result.status == "passed", result


def test_a_failing_assert_fails_with_its_message():
    result = run_program("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not result.passed
    assert result.status == "failed"
    assert "AssertionError: arithmetic" in result.detail


def test_an_endless_loop_is_stopped_at_the_time_limit():
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout_s=2)
    elapsed = time.perf_counter() - start
    assert result.status == "timeout" and not result.passed
    assert 1.9 < elapsed < 4.0


@pytest.mark.parametrize("source", [
    "x = bytearray(1024 * 2**20)\n",  # one big block, four times the limit
    "chunks = []\nwhile len(chunks) < 200:\n    chunks.append(bytearray(10**7))\n",  # growing to 2 GB
])
def test_allocating_past_the_memory_limit_is_stopped(source):
    result = run_program(source, timeout_s=10, memory_mb=256)
    assert result.status == "memory", result
    assert not result.passed


def test_the_program_cannot_reach_a_server_on_this_machine():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "s.sendall(b'hello')\n")
        result = run_program(program, timeout_s=5)
        assert not result.passed
        assert result.status in ("blocked", "failed"), result
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@pytest.mark.skipif(not network_namespace_works(), reason="unshare -rn does not work on this machine")
def test_the_program_runs_in_its_own_network_namespace():
    # Only the loopback device exists there; in the parent's namespace there are more.
    program = ("names = [line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]]\n"
               "assert names == ['lo'], names\n")
    assert run_program(program).status == "passed"


@pytest.mark.parametrize("source", [
    "import subprocess\nsubprocess.run(['echo', 'hi'])\n",
    "import os\nos.system('echo hi')\n",
    "import os\nos.fork()\n",
    "import os\nos.kill(os.getppid(), 0)\n",  # signal 0: harmless even if it got through
    "import ctypes\nctypes.CDLL('libc.so.6')\n",
])
def test_starting_processes_signalling_and_native_code_are_blocked(source):
    result = run_program(source)
    assert result.status == "blocked", result
    assert "blocked" in result.detail


def test_blocked_calls_cannot_be_caught_and_ignored():
    program = ("import subprocess\ntry:\n    subprocess.run(['true'])\nexcept BaseException:\n    pass\n"
               "print('went on')\n")
    assert run_program(program).status == "blocked"


def test_files_land_in_the_programs_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program = (f"import os\nassert os.getcwd() != {str(tmp_path)!r}\n"
               "open('out.txt', 'w').write('hi')\nassert open('out.txt').read() == 'hi'\n")
    result = run_program(program)
    assert result.passed, result
    assert not (tmp_path / "out.txt").exists()


def test_writing_or_deleting_outside_its_folder_is_blocked(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    for program in (f"open({str(target)!r}, 'w').write('gone')\n",
                    f"import os\nos.remove({str(target)!r})\n",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n"):
        assert run_program(program).status == "blocked", program
    assert target.read_text() == "keep me"


def test_flooding_stdout_neither_hangs_nor_fills_memory():
    start = time.perf_counter()
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout_s=20)
    assert time.perf_counter() - start < 10
    assert result.status == "failed" and "File too large" in result.detail, result
    assert run_program("print('y' * 2_000_000)\n").passed  # plenty of output is fine


def test_the_environment_is_clean():
    os.environ["SLIMLM_SANDBOX_SECRET"] = "x"
    try:
        program = "import os, sys\nassert 'SLIMLM_SANDBOX_SECRET' not in os.environ\nsys.stdin.read()\n"
        assert run_program(program).passed
    finally:
        del os.environ["SLIMLM_SANDBOX_SECRET"]


def test_run_many_keeps_order_and_runs_concurrently():
    sources = ["import time\ntime.sleep(1)\n", "assert False\n", "import time\ntime.sleep(1)\n", "pass\n"]
    start = time.perf_counter()
    results = run_many(sources, timeout_s=5, workers=2)
    assert [r.status for r in results] == ["passed", "failed", "passed", "passed"]
    assert time.perf_counter() - start < 1.9  # the two sleeps overlapped
