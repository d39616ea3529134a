"""Running a cell: its phases on a rank group, every wait bounded, a verdict, nothing left behind.

Each phase is handed to a group of ``world_size`` rank processes (``compat.launch.pool``) and waited for
with the cell's deadline. When a rank fails, the others get a short grace period to finish (they
usually fail the same check together) before the group is stopped; when the deadline passes,
every live rank first dumps its Python stacks (faulthandler, SIGUSR1) into the cell's logs, then
is killed, and the launcher checks that no process of any rank's group survives. A group that
finished cleanly goes back to the pool for the next cell; any other is stopped.

:func:`run_cell` is the only entry point the CLI, the pytest plugin and the bench use.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from compat.checks.problems import Problem
from compat.declare import declarations
from compat.declare.cells import Cell
from compat.declare.expected import Expected
from compat.declare.families import get_family, tiny_model_dir
from compat.declare.plugins import Plugins
from compat.declare.specs import unavailable
from compat.launch.gpus import NoGPUs
from compat.launch.pool import GroupKey, Pool, RankGroup, pool
from compat.rank.paths import CellPaths
from compat.results.record import CellResult
from compat.results.verdict import RankOutcome, verdict

__all__ = ["DEFAULT_TIMEOUT", "GRACE_AFTER_FAILURE", "STOP", "run_cell"]

DEFAULT_TIMEOUT = 300.0
GRACE_AFTER_FAILURE = 20.0
POLL = 0.01

# Set on Ctrl-C: every launch in flight stops its ranks and returns.
STOP = threading.Event()


def run_cell(
    cell: Cell,
    backend: str,
    expected: Expected | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    workdir: Path | None = None,
    keep: bool = False,
    plugins: Plugins | None = None,
    ranks: Pool | None = None,
) -> CellResult:
    """Run a cell to its result; a crash, hang or failed check is a result, never an exception.

    The cell's files go to a directory of its own under ``workdir``; they are removed when the
    outcome is the expected one (unless ``keep``), and kept, named in the result, otherwise.
    """
    expected = expected or Expected()
    plugins = plugins or Plugins()
    ranks = ranks or pool()
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix=f"{cell.id}-", dir=workdir))
    paths = CellPaths.under(root, tiny_model_dir(get_family(cell.family), backend=backend))
    status, reason = "pass", ""
    metrics: dict[str, Any] = {}
    problems: list[Problem] = []
    why = unavailable(cell.spec, backend)
    if why:
        status, reason, problems = "unsupported", why, [Problem("build", why)]
    for phase, layout in [] if why else cell.phases:
        task: dict[str, Any] = {
            "cell": cell.to_dict(),
            "phase": phase,
            "root": str(root),
            "hf": str(paths.hf),
            "backend": backend,
            "timeout": timeout,
            "plugins": plugins.as_dict(),
            "declarations": declarations.files(),
        }
        named = {**plugins.named(), **_flat(task["declarations"])}
        key = GroupKey.now(backend, layout.world_size, named, plugins.search_paths())
        try:
            group = ranks.acquire(key, gpu_timeout=timeout)
        except NoGPUs as exc:
            status, reason = ("unsupported" if "visible here" in str(exc) else "error"), str(exc)
            problems = [Problem("build" if status == "unsupported" else "run", reason)]
            break
        status, reason, metrics, problems = _run_phase(ranks, group, task, paths, timeout)
        if status != "pass":
            break
    if cell.serve and status in ("pass", "fail"):  # the export exists: each engine loads it too
        from compat import serving

        metrics = {**metrics, "serving": serving.check(cell, root, backend, timeout)}
        status, reason = serving.fold(status, reason, metrics["serving"])
        problems = [*problems, *serving.problems(metrics["serving"])]
    result = CellResult.of(cell, status, reason.strip(), time.monotonic() - start, expected, metrics, problems)
    if result.met and not keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        result.files = str(root)
    return result


def _run_phase(
    ranks: Pool, group: RankGroup, task: dict[str, Any], paths: CellPaths, timeout: float
) -> tuple[str, str, dict[str, Any], list[Problem]]:
    phase, world = task["phase"], len(group.procs)
    results = [paths.result(phase, r) for r in range(world)]
    paths.task(phase).write_text(json.dumps(task))
    group.submit(task)
    deadline, failed_at, cut = time.monotonic() + timeout, None, ""
    try:
        while True:
            records = [_read(p) for p in results]
            if all(r is not None for r in records):
                break
            now = time.monotonic()
            if STOP.is_set():
                cut = "interrupted"
                break
            if now > deadline:
                cut = f"timed out after {timeout:.0f}s"
                break
            if failed_at is None and (
                any(records[r] is None for r in group.dead())  # died without a result
                or any(r is not None and r["status"] != "pass" for r in records)
            ):
                failed_at = now
            if failed_at is not None and now - failed_at > GRACE_AFTER_FAILURE:
                cut = f"stopped {GRACE_AFTER_FAILURE:.0f}s after another rank failed"
                break
            time.sleep(POLL)
    except BaseException:
        cut = cut or "interrupted"
        raise
    finally:
        records = [_read(p) for p in results]
        trusted = not cut and all(r is not None and r["status"] != "error" and "reset" not in r for r in records)
        survivors = [] if trusted else ranks.discard(group, dump=bool(cut))
        if trusted:
            ranks.release(group, trusted=True)
    if survivors:
        cut += f"; process groups {survivors} survived SIGKILL"
    codes = [p.poll() for p in group.procs]
    # A rank that never reached the cell printed into its group's log (start-up, planted code).
    logs = [group.logs.get(r, "") + _text(paths.log(phase, r)) for r in range(world)]
    outcomes = [RankOutcome(r, codes[r], records[r], logs[r]) for r in range(world)]
    return verdict(outcomes, cut, phase)


def _flat(files: dict[str, list[str]]) -> dict[str, str]:
    return {f"{kind} declarations": ",".join(paths) for kind, paths in files.items()}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
