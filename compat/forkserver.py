"""Ranks forked from a process that has already imported the stack (CPU backend).

Importing megatron.bridge is most of a rank's cost on CPU (about 15 of 25 CPU-seconds). A fork
server imports it once, with the CPU workarounds applied, and forks each rank from there: every
rank is still a fresh process with untouched module state (nothing has run but imports), in its
own session, writing its own log and result like a cold rank. It is used only where that changes
nothing but time: the CPU backend (no CUDA context may exist before a fork), a server with a
single thread, and only while the caller's environment is the one the server started with (a
test that plants code through PYTHONPATH gets cold ranks). ``COMPAT_FORKSERVER=0`` turns it off.

Protocol: the launcher writes one JSON request per line on the server's stdin
(``{"task": ..., "env": {...}, "log": ..., "cwd": ...}``); the server answers with the child's
pid on stdout, and when it reaps a child writes ``<log>.exit`` holding its wait status.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["Forked", "spawn", "usable"]

_lock = threading.Lock()
_server: subprocess.Popen[str] | None = None
# The environment this process started with: a server forks ranks only while it is unchanged, so a
# cell run under a changed environment (a planted PYTHONPATH, say) never shares a server with others.
_VOLATILE = ("PYTEST_CURRENT_TEST",)  # pytest rewrites it for every test


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _VOLATILE}


_initial_env = _env()


def usable(backend: str) -> bool:
    if backend != "cpu" or os.environ.get("COMPAT_FORKSERVER", "1") == "0":
        return False
    return _env() == _initial_env


def _start() -> subprocess.Popen[str] | None:
    global _server
    if _server is not None and _server.poll() is None:
        return _server
    server = subprocess.Popen(
        [sys.executable, "-m", "compat.forkserver"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
        start_new_session=True,
    )
    atexit.register(_shutdown, server)
    ready = server.stdout.readline().strip() if server.stdout else ""
    if ready != "ready":
        server.kill()
        return None
    _server = server
    return server


def _shutdown(server: subprocess.Popen[str]) -> None:
    """At exit: close the server's stdin (it stops after its last fork) and wait, so none outlives us."""
    try:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        server.kill()
        server.wait()


class Forked:
    """A forked rank with the part of ``subprocess.Popen`` the launcher uses."""

    def __init__(self, pid: int, log: Path) -> None:
        self.pid = pid
        self._exit = Path(str(log) + ".exit")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._exit.exists():
            text = self._exit.read_text().strip()
            if text:
                status = int(text)
                self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.returncode


def spawn(task_path: Path, env: dict[str, str], log: Path, cwd: Path) -> Forked | None:
    """Fork a rank from the server; None where no server could be started (start it cold)."""
    with _lock:
        server = _start()
        if server is None or server.stdin is None or server.stdout is None:
            return None
        request = {"task": str(task_path), "env": env, "log": str(log), "cwd": str(cwd)}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        answer = server.stdout.readline().strip()
    return Forked(int(answer), log) if answer.isdigit() else None


def _child(request: dict[str, Any]) -> None:
    os.setsid()
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.stdin = open(0)  # the child's own stdin, for the life of the process
    from compat.worker import main

    try:
        main([request["task"]])
    finally:
        os._exit(1)  # main() exits itself; reaching here means it raised


def serve() -> None:
    """Import the stack, then fork one rank per request line until stdin closes."""
    import signal

    proto = os.fdopen(os.dup(1), "w")  # answers go here; whatever else prints goes to stderr
    os.dup2(2, 1)
    from compat import preload  # noqa: F401 - the imports every rank would otherwise repeat

    if threading.active_count() != 1:  # forking a multi-threaded process is not safe
        print("threads", file=proto, flush=True)
        return
    logs: dict[int, str] = {}

    def reap(_signum: int, _frame: Any) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            log = logs.pop(pid, None)
            if log:
                Path(log + ".exit").write_text(str(status))

    signal.signal(signal.SIGCHLD, reap)
    print("ready", file=proto, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # record the pid before reaping it
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            _child(request)
        logs[pid] = request["log"]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        print(pid, file=proto, flush=True)


if __name__ == "__main__":
    serve()
