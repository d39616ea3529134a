"""Launching a cell: one process per rank, every wait bounded, nothing left behind.

Each rank runs in its own process session, so killing its group takes any child with it.
Ranks meet through a file store in the cell's own directory (no ports to collide between
cells running at once). When a rank fails, the others get a short grace period to finish
(they usually fail the same check together) before they are stopped; when the cell's time
runs out, every live rank first dumps its Python stacks (faulthandler, SIGUSR1), then is
killed, and the launcher checks that no process of any rank's group survives.

``run_cell`` is the only entry point the CLI and the pytest plugin use; a pool of warm workers
can later replace ``_launch`` without changing either.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compat import forkserver
from compat.cells import Cell
from compat.report import CellResult
from compat.worker import result_path

__all__ = ["DEFAULT_TIMEOUT", "STOP", "Devices", "RankOutcome", "gpus", "run_cell", "verdict"]

DEFAULT_TIMEOUT = 300.0
GRACE_AFTER_FAILURE = 20.0
LOG_TAIL = 4000

# Set on Ctrl-C: every launch in flight stops its ranks and returns.
STOP = threading.Event()


@dataclass
class RankOutcome:
    rank: int
    returncode: int | None
    record: dict[str, Any] | None
    log: str

    @property
    def status(self) -> str:
        if self.record is not None:
            return self.record["status"]
        return "error"

    def describe_death(self) -> str:
        rc = self.returncode
        if rc is None:
            how = "was still running"
        elif rc < 0:
            how = f"was killed by signal {signal.Signals(-rc).name}"
        else:
            how = f"exited with code {rc} without a result"
        return f"rank {self.rank} {how}; its output ends:\n{_log_tail(self.log)}"


_DUMP_HEADER = re.compile(r"^(?:Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$", re.MULTILINE)


def _log_tail(log: str) -> str:
    """The end of a rank's log; with a stack dump, the dump from its top (the innermost frame).

    faulthandler prints the innermost frame first, so a plain tail of a deep stack (an import
    chain) would cut exactly the frame where the rank hung.
    """
    headers = list(_DUMP_HEADER.finditer(log))
    if not headers:
        return log[-LOG_TAIL:]
    start = headers[0].start()
    before, dump = log[max(start - LOG_TAIL // 4, 0) : start], log[start:]
    if len(dump) > 2 * LOG_TAIL:
        dump = dump[: 3 * LOG_TAIL // 2] + "\n  ...\n" + dump[-LOG_TAIL // 2 :]
    return before + dump


class Devices:
    """The GPUs of this machine, handed to cells running at once: a launch holds world_size of them."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self._free = list(ids)
        self._cv = threading.Condition()

    def take(self, n: int) -> list[int]:
        """n distinct GPUs (NCCL refuses two ranks of one communicator on one GPU)."""
        with self._cv:
            self._cv.wait_for(lambda: len(set(self._free)) >= n)
            taken = sorted(set(self._free))[:n]
            for i in taken:
                self._free.remove(i)
            return taken

    def give(self, ids: list[int]) -> None:
        with self._cv:
            self._free = sorted(self._free + ids)
            self._cv.notify_all()


_devices: Devices | None = None
_devices_lock = threading.Lock()


def gpus() -> Devices:
    """This process's GPU pool (imports torch once, only for the CUDA backend)."""
    global _devices
    with _devices_lock:
        if _devices is None:
            import torch

            # Tiny models: several cells may share a GPU (COMPAT_CELLS_PER_GPU), never two ranks of one cell.
            slots = int(os.environ.get("COMPAT_CELLS_PER_GPU", "1"))
            _devices = Devices(list(range(torch.cuda.device_count())) * slots)
        return _devices


def _rank_env(rank: int, world_size: int, visible: list[int] | None) -> dict[str, str]:
    env = dict(os.environ)  # workers inherit the caller's environment, PYTHONPATH included
    if visible is not None:
        parent = env.get("CUDA_VISIBLE_DEVICES")
        physical = parent.split(",") if parent else None
        env["CUDA_VISIBLE_DEVICES"] = ",".join(physical[i] if physical else str(i) for i in visible)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on few cores: no thread oversubscription
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # tiny models are built locally; never reach a hub
    return env


def _alive(procs: list[subprocess.Popen[bytes]]) -> list[subprocess.Popen[bytes]]:
    return [p for p in procs if p.poll() is None]


def _stop(procs: list[subprocess.Popen[bytes]], dump: bool) -> list[int]:
    """Dump stacks (if asked), kill every rank's process group, return groups that survived."""
    live = _alive(procs)
    if dump and live:
        for p in live:
            _signal_group(p.pid, signal.SIGUSR1)
        time.sleep(1.5)
    for p in procs:
        _signal_group(p.pid, signal.SIGKILL)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    # Killed grandchildren linger until init reaps them: give the groups a few seconds to empty.
    deadline = time.monotonic() + 10
    survivors = [p.pid for p in procs if _group_exists(p.pid)]
    while survivors and time.monotonic() < deadline:
        time.sleep(0.1)
        survivors = [pgid for pgid in survivors if _group_exists(pgid)]
    return survivors


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _launch(
    task: dict[str, Any], world_size: int, timeout: float, visible: list[int] | None = None
) -> tuple[list[RankOutcome], str]:
    """Run one phase on ``world_size`` fresh processes; return outcomes and why it was cut short."""
    root = Path(task["root"])
    phase = task["phase"]
    task_path = root / f"task-{phase}.json"
    task_path.write_text(json.dumps(task))
    procs: list[Any] = []  # subprocess.Popen, or forkserver.Forked
    logs = [root / f"{phase}-rank{r}.log" for r in range(world_size)]
    cut = ""
    try:
        fork = forkserver.usable(task["backend"])
        for rank in range(world_size):
            env = _rank_env(rank, world_size, visible)
            forked = forkserver.spawn(task_path, env, logs[rank], root) if fork else None
            if forked is not None:
                procs.append(forked)
                continue
            with open(logs[rank], "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "compat.worker", str(task_path)],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=root,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        failed_at = None
        while _alive(procs):
            now = time.monotonic()
            if STOP.is_set():
                cut = "interrupted"
                break
            if now > deadline:
                cut = f"timed out after {timeout:.0f}s"
                break
            if failed_at is None and any(
                p.poll() not in (None, 0)
                or (_read_record(result_path(root, phase, r)) or {}).get("status") not in (None, "pass")
                for r, p in enumerate(procs)
            ):
                failed_at = now
            if failed_at is not None and now - failed_at > GRACE_AFTER_FAILURE:
                cut = f"stopped {GRACE_AFTER_FAILURE:.0f}s after another rank failed"
                break
            time.sleep(0.1)
    finally:
        survivors = _stop(procs, dump=bool(cut) or sys.exc_info()[0] is not None)
    if survivors:
        cut += f"; process groups {survivors} survived SIGKILL"
    outcomes = [
        RankOutcome(r, p.returncode, _read_record(result_path(root, phase, r)), logs[r].read_text(errors="replace"))
        for r, p in enumerate(procs)
    ]
    return outcomes, cut


def verdict(outcomes: list[RankOutcome], cut: str, phase: str) -> tuple[str, str, dict[str, Any]]:
    """(status, reason, metrics) of one phase: the first rank to stop is the cause.

    Errors, then unsupported, then failed checks, unless a check failed before any error: peers
    left in a collective by a failing rank then break there ("connection closed"), after the fact.
    """
    where = f"[{phase}] " if phase != "roundtrip" else ""

    def first(group: list[RankOutcome]) -> RankOutcome:
        return min(group, key=lambda o: (o.record.get("at", float("inf")), o.rank))

    def then(group: list[RankOutcome]) -> str:
        return "".join(f"\nthen rank {o.rank} raised {o.record['reason'][:200]}" for o in group)

    errors = [o for o in outcomes if o.record and o.record["status"] == "error"]
    fails = [o for o in outcomes if o.record and o.record["status"] == "fail"]
    failed_first = bool(fails) and (
        not errors or first(fails).record.get("at", float("inf")) < first(errors).record.get("at", float("inf"))
    )
    if errors and not failed_first:
        # The first rank to break is the cause; peers then fail in a collective ("connection closed").
        o = first(errors)
        rest = [e for e in errors if e is not o]
        return "error", f"{where}rank {o.rank} raised {o.record['reason']}\n{o.record['traceback']}{then(rest)}", {}
    unsupported = [o for o in outcomes if o.record and o.record["status"] == "unsupported"]
    if unsupported and not errors:
        return "unsupported", where + unsupported[0].record["reason"], {}
    if fails:
        # A check failed first; peers left in a collective by it may then break there.
        o = first(fails)
        return "fail", where + o.record["reason"] + then(errors), o.record.get("metrics") or {}
    dead = [o for o in outcomes if o.record is None]
    if dead or cut:
        detail = "\n".join(o.describe_death() for o in dead)
        return "error", f"{where}{cut or 'a rank died'}\n{detail}".rstrip(), {}
    return "pass", "", outcomes[0].record.get("metrics", {}) if outcomes[0].record else {}


def run_cell(
    cell: Cell,
    backend: str,
    expected: tuple[str, str] = ("pass", ""),
    timeout: float = DEFAULT_TIMEOUT,
    workdir: Path | None = None,
    keep: bool = False,
) -> CellResult:
    """Run a cell to its result; a crash, hang or failed check is a result, never an exception."""
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix=f"{cell.id}-", dir=workdir))
    phases = [("save", cell.layout), ("load", cell.load_layout)] if cell.reshards else [("roundtrip", cell.layout)]
    status, reason, metrics = "pass", "", {}
    for phase, layout in phases:
        task = {"cell": cell.to_dict(), "phase": phase, "root": str(root), "backend": backend, "timeout": timeout}
        if backend == "cuda":
            pool = gpus()
            if layout.world_size > len(set(pool.ids)):
                status, reason = "unsupported", f"needs {layout.world_size} GPUs, {len(set(pool.ids))} visible here"
                break
            visible = pool.take(layout.world_size)
            try:
                outcomes, cut = _launch(task, layout.world_size, timeout, visible)
            finally:
                pool.give(visible)
        else:
            outcomes, cut = _launch(task, layout.world_size, timeout)
        status, reason, metrics = verdict(outcomes, cut, phase)
        if status != "pass":
            break
    if status != "pass" or keep:
        reason += f"\n(files kept in {root})" if status != "pass" else ""
    else:
        _remove(root)
    return CellResult.of(cell, status, reason.strip(), time.monotonic() - start, expected, metrics)


def _remove(root: Path) -> None:
    import shutil

    shutil.rmtree(root, ignore_errors=True)
