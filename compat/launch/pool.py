"""Rank groups: the processes that run a cell's ranks, kept warm from cell to cell where they can be trusted.

A group is ``world_size`` rank processes (``compat.rank.worker``) that joined one process group. In
``warm`` mode (the default) a group that finished a cell cleanly goes back to the pool and runs
the next cell of the same world size, environment and plugins, so imports, the process group and
every lazily built upstream cache are paid once. A group is never reused after anything it could
have carried over: a rank that errored, died, hung or failed to tear down, a cell that was cut
short, or another environment (planted faults, other plugins: the key differs, so such a cell gets
a group of its own). ``fork`` and ``cold`` modes start fresh processes for every cell (forked from
the fork server, or started cold), as the bench compares. On GPUs a group holds its GPUs while it
lives; an idle group gives them up when a cell needs them.
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compat.launch import forkserver
from compat.rank.paths import task_file, write_json_atomic

__all__ = ["MODES", "GroupKey", "Pool", "RankGroup", "pool"]

MODES = ("warm", "fork", "cold")


@dataclass(frozen=True)
class GroupKey:
    """What a group's processes were started with: only a cell with the same key may use it."""

    backend: str
    world_size: int
    env: tuple[tuple[str, str], ...]
    plugins: tuple[tuple[str, str], ...]
    paths: tuple[str, ...] = ()  # put in front of the ranks' PYTHONPATH (where the plugins import from)

    @classmethod
    def now(cls, backend: str, world_size: int, plugins: dict[str, str], paths: list[str] | None = None) -> GroupKey:
        env = tuple(sorted(forkserver.environment().items()))
        return cls(backend, world_size, env, tuple(sorted(plugins.items())), tuple(paths or ()))


class RankGroup:
    """``world_size`` rank processes serving tasks from one directory."""

    _ids = itertools.count()

    def __init__(self, key: GroupKey, root: Path, mode: str, visible: list[int] | None) -> None:
        self.key, self.mode, self.visible = key, mode, visible
        self.dir = Path(tempfile.mkdtemp(prefix=f"group{next(self._ids)}-w{key.world_size}-", dir=root))
        self.seq = 0
        self.cells = 0
        self.logs: dict[int, str] = {}  # filled when the group is stopped
        self.procs: list[Any] = []  # subprocess.Popen or forkserver.Forked
        fork = mode != "cold" and forkserver.usable(key.backend)
        for rank in range(key.world_size):
            env = _rank_env(rank, key, visible, once=mode != "warm")
            log = self.dir / f"rank{rank}.log"
            forked = forkserver.spawn(self.dir, env, log, self.dir) if fork else None
            self.procs.append(forked or _popen(self.dir, env, log))

    def submit(self, task: dict[str, Any]) -> None:
        """Hand every rank the same task (atomically written: a rank never reads half of it)."""
        for rank in range(len(self.procs)):
            write_json_atomic(task_file(self.dir, rank, self.seq), task)
        self.seq += 1
        self.cells += 1

    def dead(self) -> list[int]:
        """Ranks whose process has exited."""
        return [r for r, p in enumerate(self.procs) if p.poll() is not None]

    def stop(self, dump: bool) -> list[int]:
        """Dump stacks (if asked), kill every rank's process group; return the groups that survived."""
        live = [p for p in self.procs if p.poll() is None]
        if dump and live:
            for p in live:
                _signal_group(p.pid, signal.SIGUSR1)
            time.sleep(1.5)
        for p in self.procs:
            _signal_group(p.pid, signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Killed grandchildren linger until init reaps them: give the groups a few seconds to empty.
        deadline = time.monotonic() + 10
        survivors = [p.pid for p in self.procs if _group_exists(p.pid)]
        while survivors and time.monotonic() < deadline:
            time.sleep(0.05)
            survivors = [pgid for pgid in survivors if _group_exists(pgid)]
        return survivors


class Pool:
    """The rank groups of this process: idle ones by key, handed out and taken back by the launcher."""

    def __init__(self, mode: str | None = None, max_idle_ranks: int | None = None) -> None:
        self.mode = mode or _default_mode()
        if self.mode not in MODES:
            raise ValueError(f"unknown rank mode {self.mode!r}; known: {', '.join(MODES)}")
        # A warm CPU rank holds about 1 GB (and megatron's checkpoint-writer queue process another
        # 0.5 GB): enough idle ranks for one group of each world size the CI matrix uses (1, 2, 4).
        self.max_idle_ranks = max_idle_ranks or int(os.environ.get("COMPAT_POOL_RANKS", "7"))
        self._idle: list[RankGroup] = []  # least recently used first
        self._lock = threading.Lock()
        self._root: Path | None = None

    def _dir(self) -> Path:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="compat-ranks-"))
        return self._root

    def acquire(self, key: GroupKey, gpu_timeout: float) -> RankGroup:
        """An idle group of this key, or a new one (on GPUs taken for it, waiting at most ``gpu_timeout``)."""
        with self._lock:
            for group in self._idle:
                if group.key == key and not group.dead():
                    self._idle.remove(group)
                    return group
        visible = None
        if key.backend == "cuda":
            from compat.launch.gpus import gpus

            visible = gpus().take(key.world_size, gpu_timeout, evict=lambda: self.evict_idle(holding_gpus=True))
        return RankGroup(key, self._dir(), self.mode, visible)

    def release(self, group: RankGroup, trusted: bool) -> None:
        """Take a group back: kept for the next cell if trusted (and warm), else stopped."""
        if not trusted or self.mode != "warm" or group.dead():
            _close(group)
            return
        with self._lock:
            self._idle.append(group)
            evicted = self._trim(self.max_idle_ranks)
        for g in evicted:
            _retire(g)

    def evict_idle(self, holding_gpus: bool = False) -> bool:
        """Stop the least recently used idle group (one holding GPUs, if asked); whether one was stopped."""
        with self._lock:
            candidates = [g for g in self._idle if not holding_gpus or g.visible]
            if not candidates:
                return False
            self._idle.remove(candidates[0])
        _retire(candidates[0])
        return True

    def _trim(self, max_ranks: int) -> list[RankGroup]:
        """Least recently used groups beyond ``max_ranks`` idle ranks, and all but the newest group of
        another environment than this process's (planted faults, other plugins: rarely used twice)."""
        evicted = []
        foreign = [g for g in self._idle if dict(g.key.env) != forkserver.BASE_ENV]
        for g in foreign[:-1]:
            self._idle.remove(g)
            evicted.append(g)
        while sum(g.key.world_size for g in self._idle) > max_ranks and self._idle:
            evicted.append(self._idle.pop(0))
        return evicted

    def discard(self, group: RankGroup, dump: bool) -> list[int]:
        """Stop a group that cannot be trusted (stacks dumped first, if asked); the groups that survived."""
        return _close(group, dump)

    def shutdown(self) -> None:
        """Stop every idle group (at exit; groups in use are stopped by their launch)."""
        import shutil

        with self._lock:
            idle, self._idle = self._idle, []
        for g in idle:
            _retire(g)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def _retire(group: RankGroup) -> None:
    """Stop an idle group: a stop task first (clean exit), then the kill that leaves nothing behind."""
    for rank in range(len(group.procs)):
        write_json_atomic(task_file(group.dir, rank, group.seq), {"stop": True})
    deadline = time.monotonic() + 2
    while len(group.dead()) < len(group.procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    _close(group)


def _close(group: RankGroup, dump: bool = False) -> list[int]:
    """Stop a group's processes, give its GPUs back and remove its directory; the groups that survived.

    What each rank printed outside a cell (before its first task: start-up, planted code) is kept
    in ``group.logs`` for the verdict.
    """
    import shutil

    survivors = group.stop(dump)
    group.logs = {r: _text(group.dir / f"rank{r}.log") for r in range(len(group.procs))}
    if group.visible is not None:
        from compat.launch.gpus import gpus

        gpus().give(group.visible)
    shutil.rmtree(group.dir, ignore_errors=True)
    return survivors


def _default_mode() -> str:
    if os.environ.get("COMPAT_RANKS"):
        return os.environ["COMPAT_RANKS"]
    return "cold" if os.environ.get("COMPAT_FORKSERVER", "1") == "0" else "warm"


def _rank_env(rank: int, key: GroupKey, visible: list[int] | None, once: bool) -> dict[str, str]:
    from compat.rank.backends import rank_env

    env = dict(os.environ)  # ranks inherit the caller's environment, PYTHONPATH included
    for name, value in rank_env(key.backend).items():
        env.setdefault(name, value)
    from compat.declare.plugins import with_paths

    # Ranks run in their own directory: relative entries mean the caller's.
    env["PYTHONPATH"] = with_paths(env.get("PYTHONPATH", ""), list(key.paths))
    if not env["PYTHONPATH"]:
        del env["PYTHONPATH"]
    if visible is not None:
        parent = env.get("CUDA_VISIBLE_DEVICES")
        physical = parent.split(",") if parent else None
        env["CUDA_VISIBLE_DEVICES"] = ",".join(physical[i] if physical else str(i) for i in visible)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(key.world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(key.world_size),
        PYTHONUNBUFFERED="1",
        COMPAT_LAUNCHER_PID=str(os.getpid()),
        COMPAT_RANK_ONCE="1" if once else "0",
    )
    for name, value in forkserver.RANK_DEFAULTS.items():
        env.setdefault(name, value)
    return env


def _popen(group_dir: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "compat.rank.worker", str(group_dir)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=group_dir,
            start_new_session=True,  # its own process group: killing it takes any child with it
        )


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _group_exists(pgid: int) -> bool:
    """A process of group ``pgid`` still runs: zombies (dead, waiting to be reaped) do not count, since
    a sandbox's init may reap orphans only every second or so."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


_pool: Pool | None = None
_pool_lock = threading.Lock()


def pool() -> Pool:
    """This process's pool (created on first use, shut down at exit)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = Pool()
            atexit.register(_pool.shutdown)
        return _pool
