"""A rank: ``python -m compat.worker TASK.json``, with RANK, WORLD_SIZE and LOCAL_RANK set.

It writes ``<root>/<phase>-rank<N>.json`` with its status (``pass``, ``fail`` with the reason of a
failed check, ``error`` with its traceback); its output goes to ``<phase>-rank<N>.log``, where a
SIGUSR1 from the launcher makes it dump every thread's stack (faulthandler) before it is killed.
``run_task`` is the unit of work, separate from process start-up, so a warm worker can later
run many tasks in one process.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = ["main", "result_path", "run_task"]


def result_path(root: Path, phase: str, rank: int) -> Path:
    return root / f"{phase}-rank{rank}.json"


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)


def run_task(task: dict[str, Any], rank: int, world_size: int, local_rank: int) -> dict[str, Any]:
    """Run one phase of one cell in this process; return this rank's result record."""
    import torch.distributed as dist

    from compat.backends import get_backend
    from compat.cells import Cell
    from compat.roundtrip import CheckFailed, Paths, Unsupported, run_phase

    root = Path(task["root"])
    try:
        backend = get_backend(task["backend"])
        backend.setup(local_rank)
        dist.init_process_group(
            backend.dist_backend,
            init_method=f"file://{root}/rendezvous-{task['phase']}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=task["timeout"]),
        )
        metrics = run_phase(Cell.from_dict(task["cell"]), task["phase"], Paths(root), backend)
        _teardown()
        return {"rank": rank, "status": "pass", "metrics": metrics}
    except CheckFailed as exc:
        metrics = exc.args[1] if len(exc.args) > 1 else {}
        return {"rank": rank, "status": "fail", "reason": str(exc.args[0]), "metrics": metrics, "at": time.time()}
    except Unsupported as exc:
        return {"rank": rank, "status": "unsupported", "reason": str(exc)}
    except BaseException as exc:
        return {
            "rank": rank,
            "status": "error",
            "reason": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
            "at": time.time(),  # which rank broke first: the others often fail on it in a collective
        }


def _teardown() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    task = json.loads(Path(argv[0]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result = run_task(task, rank, world, int(os.environ.get("LOCAL_RANK", rank)))
    _write(result_path(Path(task["root"]), task["phase"], rank), result)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: after a failure, process-group destructors can block on peers.
    os._exit(0 if result["status"] != "error" else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
