"""Rank processes forked from a process that has already imported the stack (CPU backend).

Importing megatron.bridge is most of a cold rank's cost on CPU (about 15 of 25 CPU-seconds). A
fork server imports it once, with the CPU workarounds applied, and forks each rank process from
there: every rank is still a fresh process with untouched module state (nothing has run but
imports), in its own session, serving its rank group like a cold one (``compat.rank.worker``). It is
used only where that changes nothing but time: the CPU backend (no CUDA context may exist before
a fork), a server with a single thread, and an environment that differs from the one the server
started with at most in what no import reads: ``COMPAT_*`` variables, and ``PYTHONPATH`` entries
put in front that shadow no module the server imported. Such a child takes the environment and
imports ``sitecustomize`` from the new entries, as a fresh interpreter would have at start (that is
how tests plant faults in every rank); any other difference gets cold ranks.
``COMPAT_FORKSERVER=0`` turns it off. Every wait on the server is bounded.

Protocol: the launcher writes one JSON request per line on the server's stdin
(``{"group": ..., "env": {...}, "log": ..., "cwd": ...}``); the server answers with the child's
pid on stdout, and when it reaps a child writes ``<log>.exit`` holding its wait status.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from compat.rank.liveness import process_alive

__all__ = ["BASE_ENV", "Forked", "environment", "spawn", "start", "usable"]

_lock = threading.Lock()
_server: subprocess.Popen[str] | None = None
START_TIMEOUT = 300.0  # the server imports the whole stack before it answers
LOG = Path(tempfile.gettempdir()) / f"compat-forkserver-{os.getpid()}.log"
ANSWER_TIMEOUT = 30.0
# What no import reads, or what the stack's own imports set (transformers sets the Inductor cache
# directory when imported): differences here do not make another environment.
_VOLATILE = ("PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR")
# Set by the launcher for each rank and read only after start-up (torch.distributed's init, stdio).
_PER_RANK = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PYTHONUNBUFFERED")
# The harness's own variables: read by the launcher, or by a rank when it runs a cell, never at start-up.
_HARNESS = (
    "COMPAT_CACHE",
    "COMPAT_CELLS_PER_GPU",
    "COMPAT_FORKSERVER",
    "COMPAT_LAUNCHER_PID",
    "COMPAT_POOL_RANKS",
    "COMPAT_RANKS",
    "COMPAT_RANK_ONCE",
    "COMPAT_WORKDIR",
)
# Code Python runs at start-up from sys.path, which may read any variable then.
_STARTUP = ("sitecustomize", "usercustomize")
# What every rank starts with unless the caller says otherwise: the server starts with it too.
RANK_DEFAULTS = {
    "OMP_NUM_THREADS": "1",  # N ranks on few cores: no thread oversubscription
    "GLOO_SOCKET_IFNAME": "lo",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",  # tiny models are built locally; never reach a hub
}


def environment() -> dict[str, str]:
    """This process's environment, less what a test runner or the stack's imports rewrite."""
    return {k: v for k, v in os.environ.items() if k not in _VOLATILE}


BASE_ENV = environment()  # the environment the process started with (imported early by the plugin)


def usable(backend: str) -> bool:
    """Whether ranks of ``backend`` may be asked of the server (it still refuses an environment it
    cannot give a child: :func:`refusal`)."""
    return backend == "cpu" and os.environ.get("COMPAT_FORKSERVER", "1") != "0"


def _paths(env: dict[str, str]) -> list[str]:
    return [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def added_paths(env: dict[str, str], base: dict[str, str]) -> list[str] | None:
    """PYTHONPATH entries ``env`` puts in front of ``base``'s; None if it changes them otherwise."""
    new, old = _paths(env), _paths(base)
    if len(new) < len(old) or new[len(new) - len(old) :] != old:
        return None
    return new[: len(new) - len(old)]


def refusal(env: dict[str, str], base: dict[str, str]) -> str:
    """Why a child of a server whose environment is ``base`` cannot stand for a fresh interpreter
    started with ``env`` ("" if it can): only the harness's variables, per-rank variables, new
    PYTHONPATH entries in front (shadowing no module already imported) and other ``COMPAT_*``
    variables may differ; those last only while the server ran no start-up code (``sitecustomize``)
    that could have read them: a planted ``COMPAT_FAULT`` must reach the code that plants it."""
    changed = {k for k in set(env) | set(base) if env.get(k) != base.get(k)} - {*_VOLATILE, *_PER_RANK, *_HARNESS}
    startup = [name for name in _STARTUP if name in sys.modules]
    other = sorted(k for k in changed if k != "PYTHONPATH" and (startup or not k.startswith("COMPAT_")))
    if other:
        ran = f" (this server ran {startup[0]} at start-up with other values)" if startup else ""
        return f"environment differs in {', '.join(other[:5])}{ran}"
    added = added_paths(env, base)
    if added is None:
        return "PYTHONPATH differs in more than new entries in front"
    shadowed = _shadowing(added)
    return f"PYTHONPATH shadows {', '.join(shadowed[:5])}" if shadowed else ""


def start() -> bool:
    """Start the server now (it imports the stack: seconds), so later forks find it ready."""
    with _lock:
        return _start() is not None


def _start() -> subprocess.Popen[str] | None:
    global _server
    if _server is not None and _server.poll() is None:
        return _server
    server = subprocess.Popen(
        [sys.executable, "-m", "compat.launch.forkserver"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(LOG, "wb"),  # what the server prints (its imports' warnings, a failure): kept
        text=True,
        # The base environment, whatever the caller has now: a planted fault's env must not reach the server.
        env={**RANK_DEFAULTS, **BASE_ENV},
        start_new_session=True,
    )
    if _readline(server, START_TIMEOUT) != "ready":
        server.kill()
        server.wait()
        return None
    _server = server
    return server


def _readline(server: subprocess.Popen[str], timeout: float) -> str:
    """One answer line from the server, or "" if none comes in time (the caller gives up on it)."""
    assert server.stdout is not None
    ready, _, _ = select.select([server.stdout], [], [], timeout)
    return server.stdout.readline().strip() if ready else ""


@atexit.register
def _shutdown_at_exit() -> None:
    """Registered at import, so it runs after what users of the server registered later (LIFO)."""
    if _server is not None:
        _shutdown(_server)


def _shutdown(server: subprocess.Popen[str]) -> None:
    """Close the server's stdin (it stops after its last fork) and wait, so none outlives us."""
    try:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        server.kill()
        server.wait()
    if server.returncode == 0:
        LOG.unlink(missing_ok=True)


UNKNOWN_EXIT = 255  # a rank that exited after its server was gone: no one recorded how


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
        if self.returncode is None and not process_alive(self.pid):  # reaped by another after the server went
            self.returncode = UNKNOWN_EXIT
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.returncode


def spawn(group_dir: Path, env: dict[str, str], log: Path, cwd: Path) -> Forked | None:
    """Fork a rank process serving ``group_dir``; None where the server is not there (start it cold)."""
    global _server
    with _lock:
        server = _start()
        if server is None or server.stdin is None or server.stdout is None:
            return None
        request = {"group": str(group_dir), "env": env, "log": str(log), "cwd": str(cwd)}
        try:
            server.stdin.write(json.dumps(request) + "\n")
            server.stdin.flush()
        except OSError:
            answer = ""
        else:
            answer = _readline(server, ANSWER_TIMEOUT)
        if answer.startswith("cold"):  # this environment needs a fresh interpreter
            return None
        if not answer.isdigit():  # a server that does not answer is not used again
            server.kill()
            _server = None
            return None
    return Forked(int(answer), log)


def _shadowing(paths: list[str]) -> list[str]:
    """Modules this process imported that ``paths`` would have provided from elsewhere."""
    import importlib.machinery

    out = []
    for name, module in list(sys.modules.items()):
        origin = getattr(getattr(module, "__spec__", None), "origin", None)
        if "." in name or not origin:
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, paths)
        if spec is not None and spec.origin != origin:
            out.append(name)
    return out


def _child(request: dict[str, Any]) -> None:
    import faulthandler
    import signal

    os.setsid()
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # before any planted code runs
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.stdin = open(0)  # the child's own stdin, for the life of the process
    added = added_paths(request["env"], request["base"]) or []
    if added:  # what a fresh interpreter with this PYTHONPATH would have done at start
        sys.path[1:1] = added
        import importlib.util

        if importlib.util.find_spec("sitecustomize") is not None:
            import sitecustomize  # noqa: F401
    from compat.rank.worker import main

    try:
        main([request["group"]])
    finally:
        os._exit(1)  # main() exits itself; reaching here means it raised


def serve() -> None:
    """Import the stack, then fork one rank per request line until stdin closes."""
    import signal

    proto = os.fdopen(os.dup(1), "w")  # answers go here; whatever else prints goes to stderr
    os.dup2(2, 1)
    import gc

    from compat.rank import preload  # noqa: F401 - the imports every rank would otherwise repeat

    # Every object so far lives as long as the server: frozen, so no rank's first full collection
    # walks the 670k objects it inherits (0.4 s per rank).
    gc.collect()
    gc.freeze()
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
    base = environment()  # what this server's interpreter started with, and its imports set
    for line in sys.stdin:
        request = json.loads(line)
        why = refusal(request["env"], base)
        if why:  # a fresh interpreter would differ: the caller starts this rank cold
            print(f"cold: {why}", file=proto, flush=True)
            continue
        request["base"] = base
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
