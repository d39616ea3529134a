"""Cells run inside an external launcher: ``torchrun --nproc-per-node N -m compat run ...``.

The launcher (torchrun, Slurm) owns the processes, so this process is one rank of a group that
lives for the whole run: it joins the process group once (``env://``), runs each cell whose world
size equals WORLD_SIZE (the others are ``unsupported`` with that reason), and the ranks' records
are gathered over the harness's own collectives, so rank 0 decides each phase's verdict from what
every rank returned. Files go to a fresh directory that rank 0 makes under ``COMPAT_WORKDIR``
(default the temp dir; set it to a shared path across nodes) and names to the others. A hang here
cannot be killed from inside: the outer launcher's timeout bounds it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from compat.checks.problems import Problem
from compat.declare import declarations
from compat.declare.cells import Cell
from compat.declare.expected import Expectations
from compat.declare.families import get_family, tiny_model_dir
from compat.declare.plugins import Plugins
from compat.declare.specs import unavailable
from compat.declare.versions import installed_versions
from compat.rank.paths import CellPaths
from compat.rank.worker import reset, run_task
from compat.results.record import CellResult
from compat.results.verdict import RankOutcome, verdict

__all__ = ["is_external_launch", "run_here"]


def is_external_launch() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def run_here(
    cells: list[Cell], backend: str, expectations: Expectations, timeout: float, plugins: Plugins
) -> list[CellResult] | None:
    """Run this rank's part of every cell; rank 0 returns the results, other ranks None."""
    import torch.distributed as dist

    from compat.rank.backends import get_backend
    from compat.rank.collective import Collective

    world = int(os.environ["WORLD_SIZE"])
    runner = get_backend(backend)
    runner.setup(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    dist.init_process_group(runner.dist_backend, init_method="env://", timeout=timedelta(seconds=timeout))
    comm = Collective()
    base = Path(os.environ.get("COMPAT_WORKDIR", tempfile.gettempdir()))
    run_dir = Path(comm.broadcast(tempfile.mkdtemp(prefix="compat-external-", dir=base) if comm.rank == 0 else None))
    versions = installed_versions()
    results = []
    for cell in cells:
        start = time.monotonic()
        expected = expectations.for_cell(cell.id, versions, cell.spec)
        sizes = {layout.world_size for _, layout in cell.phases}
        why = unavailable(cell.spec, backend)
        if sizes != {world}:
            why = f"world_size {'/'.join(map(str, sorted(sizes)))} != WORLD_SIZE {world} of this launch"
        status, reason = ("unsupported", why) if why else ("pass", "")
        metrics: dict[str, Any] = {}
        problems = [Problem("build", why)] if why else []
        root = run_dir / cell.id
        paths = CellPaths.under(root, tiny_model_dir(get_family(cell.family), backend=backend))
        for phase, _ in [] if why else cell.phases:
            if comm.rank == 0:
                root.mkdir(parents=True, exist_ok=True)
            comm.barrier()
            task = {"cell": cell.to_dict(), "phase": phase, "root": str(root), "hf": str(paths.hf), "backend": backend,
                    "timeout": timeout, "plugins": plugins.as_dict(), "declarations": declarations.files()}  # fmt: skip
            records = comm.gather(run_task(task, comm, runner))
            reset(comm)
            outcomes = [RankOutcome(r, None, record, "") for r, record in enumerate(records)]
            status, reason, metrics, problems = verdict(outcomes, "", phase)
            if status != "pass":
                break
        result = CellResult.of(cell, status, reason, time.monotonic() - start, expected, metrics, problems)
        if comm.rank == 0 and result.met:
            shutil.rmtree(root, ignore_errors=True)
        elif not result.met:
            result.files = str(root)
        results.append(result)
    return results if comm.rank == 0 else None
