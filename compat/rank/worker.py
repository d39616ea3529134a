"""A rank: one process of a rank group, running the phases of cells it is handed, one after another.

``python -m compat.rank.worker GROUP_DIR`` (RANK, WORLD_SIZE, LOCAL_RANK set), or forked by
``compat.launch.forkserver``. The process joins its group's process group once (a file store in
``GROUP_DIR``) and creates the harness's own collectives; then it waits for tasks, one JSON file
per task (``rank<R>-<N>.task``, written by the launcher), and for each: sends its output to the
cell's ``<phase>-rank<R>.log``, runs the phase, writes ``<phase>-rank<R>.json`` (``pass``; ``fail``
with the reason of a failed check; ``unsupported``; ``error`` with its traceback) and tears the
model-parallel state down, so the next cell starts clean. A SIGUSR1 dumps every thread's stack
into the current log (faulthandler). It stops on a ``stop`` task, when its launcher is gone, or
when told to run one task only (cold ranks).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from compat.rank.liveness import process_alive
from compat.rank.paths import CellPaths, task_file, write_json_atomic

__all__ = ["main", "run_task"]

POLLS = (0.002, 0.05)  # seconds between looks for the next task: soon after a task, then when idle
BUSY_FOR = 1.0  # seconds after a task during which the next one is looked for often


def run_task(task: dict[str, Any], comm: Any, backend: Any) -> dict[str, Any]:
    """Run one phase of one cell in this process; return this rank's result record."""
    from compat.checks.findings import CheckFailed, Unsupported
    from compat.declare import declarations
    from compat.declare.cells import Cell
    from compat.declare.plugins import Plugins
    from compat.rank.plugin_calls import recording
    from compat.rank.roundtrip import DEFAULT_PLUGINS, run_phase

    rank = comm.rank
    try:
        declarations.use(task.get("declarations"))
        # cast: roundtrip.DEFAULT_PLUGINS has no annotation, so mypy joins its three signatures to ``function``
        defaults = cast("Mapping[str, Callable[..., Any]]", DEFAULT_PLUGINS)
        plugins = Plugins.from_dict(task.get("plugins")).resolve(defaults, recording)
        paths = CellPaths.under(Path(task["root"]), Path(task["hf"]))
        cell = Cell.from_dict(task["cell"])
        with profiled(f"{cell.id}.{task['phase']}.rank{rank}"):
            metrics = run_phase(cell, task["phase"], paths, backend, comm, plugins)
        return {"rank": rank, "status": "pass", "metrics": metrics}
    except CheckFailed as exc:
        problems = [p.as_dict() for p in exc.problems]
        return {"rank": rank, "status": "fail", "reason": exc.reason, "problems": problems, "metrics": exc.metrics,
                "at": time.time()}  # fmt: skip
    except Unsupported as exc:
        problems = [{"check": "build", "message": str(exc), "where": ""}]
        return {"rank": rank, "status": "unsupported", "reason": str(exc), "problems": problems, "at": time.time()}
    except BaseException as exc:
        return _error_record(rank, exc)


@contextlib.contextmanager
def profiled(name: str) -> Iterator[None]:
    """With ``COMPAT_PROFILE=DIR`` (``compat bench --profile DIR``), a cProfile of what runs inside:
    ``DIR/NAME.prof`` and the top functions by cumulative and own time in ``DIR/NAME.txt``. Where a
    step's seconds go on a machine that cannot be profiled interactively (a lent GPU)."""
    where = os.environ.get("COMPAT_PROFILE")
    if not where:
        yield
        return
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        out = Path(where)
        out.mkdir(parents=True, exist_ok=True)
        profile.dump_stats(out / f"{name}.prof")
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text).strip_dirs()
        stats.sort_stats("cumulative").print_stats(60)
        stats.sort_stats("tottime").print_stats(30)
        (out / f"{name}.txt").write_text(text.getvalue())


def _error_record(rank: int, exc: BaseException) -> dict[str, Any]:
    """The run broke: the exception as the one problem, placed at its innermost upstream frame."""
    from compat.checks.upstream import upstream_frame

    message = f"{type(exc).__name__}: {exc}"
    return {
        "rank": rank,
        "status": "error",
        "reason": message,
        "problems": [{"check": "run", "message": message, "where": upstream_frame(exc)}],
        "traceback": traceback.format_exc(),
        "at": time.time(),  # which rank broke first: the others often fail on it in a collective
    }


def reset(comm: Any) -> None:
    """Tear down what a cell set up, keeping the default process group and the harness's (``comm``)."""
    import gc

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    parallel_state.destroy_model_parallel()
    try:
        from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

        destroy_num_microbatches_calculator()
    except ImportError:
        pass
    keep = {distributed_c10d._get_default_group(), comm.group}
    for group in list(distributed_c10d._world.pg_map):
        if group not in keep:
            dist.destroy_process_group(group)
    gc.collect()
    # What is left now lives as long as the process (modules, upstream caches): later collections
    # need not walk it again, which keeps a warm cell's teardown in milliseconds.
    gc.freeze()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _join(group_dir: Path, task: dict[str, Any]) -> tuple[Any, Any]:
    """Join the group's process group (once per process) and set up the harness's collectives."""
    import torch.distributed as dist

    from compat.rank.backends import get_backend
    from compat.rank.collective import Collective

    backend = get_backend(task["backend"])
    backend.setup(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    dist.init_process_group(
        backend.dist_backend,
        init_method=f"file://{group_dir}/rendezvous",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timedelta(seconds=task["timeout"]),
    )
    return Collective(), backend


def _redirect(path: Path) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _next_task(group_dir: Path, rank: int, seq: int, launcher: int) -> dict[str, Any] | None:
    """Wait for the next task; None when the launcher is gone or the group directory removed."""
    path = task_file(group_dir, rank, seq)
    since = time.monotonic()
    while not path.exists():
        if not group_dir.is_dir() or not process_alive(launcher):
            return None
        time.sleep(POLLS[time.monotonic() - since > BUSY_FOR])
    return json.loads(path.read_text())


def serve(group_dir: Path) -> int:
    """Run tasks until told to stop; returns the exit status."""
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    rank = int(os.environ["RANK"])
    launcher = int(os.environ.get("COMPAT_LAUNCHER_PID", os.getppid()))
    once = os.environ.get("COMPAT_RANK_ONCE") == "1"
    comm = backend = None
    seq = 0
    while (task := _next_task(group_dir, rank, seq, launcher)) is not None and not task.get("stop"):
        paths = CellPaths.under(Path(task["root"]), Path(task["hf"]))
        _redirect(paths.log(task["phase"], rank))
        if comm is None:
            try:
                comm, backend = _join(group_dir, task)
            except BaseException as exc:
                record = _error_record(rank, exc)
                write_json_atomic(paths.result(task["phase"], rank), record)
                return 1
        started, environ = time.monotonic(), dict(os.environ)
        record = run_task(task, comm, backend)
        ran = time.monotonic()
        if not once and record["status"] != "error":
            try:
                # Upstream code sets variables as it configures a model (megatron's NVTE_*_ATTN from
                # the attention backend): the next cell starts from the environment this one had.
                os.environ.clear()
                os.environ.update(environ)
                reset(comm)
            except BaseException:
                record["reset"] = traceback.format_exc()  # the launcher will not trust this rank again
        record["seconds"] = {"task": round(ran - started, 3), "reset": round(time.monotonic() - ran, 3)}
        write_json_atomic(paths.result(task["phase"], rank), record)
        _redirect(group_dir / f"rank{rank}.log")
        if once or record["status"] == "error" or "reset" in record:
            return 0 if record["status"] != "error" else 1
        seq += 1
    return 0


def main(argv: list[str]) -> None:
    code = serve(Path(argv[0]))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: after a failure, process-group destructors can block on peers.
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
