"""Cells run inside an external launcher: ``torchrun --nproc-per-node N -m compat run ...``.

The launcher (torchrun, Slurm) owns the processes, so this process is one rank: it runs the
cells whose world size equals WORLD_SIZE, reports the others ``unsupported`` with that reason,
and rank 0 assembles every rank's record and writes the output. Ranks meet in a directory all
of them can see (``COMPAT_WORKDIR``, default the temp dir: set it to a shared path across
nodes). A hang here cannot be killed from inside: the outer launcher's timeout bounds it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from compat.cells import Cell
from compat.expected import Expectations
from compat.launch import RankOutcome, verdict
from compat.report import CellResult
from compat.versions import installed_versions
from compat.worker import result_path, run_task

__all__ = ["is_external_launch", "run_here"]


def is_external_launch() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _wait_for(paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.2)


def run_here(cells: list[Cell], backend: str, expectations: Expectations, timeout: float) -> list[CellResult] | None:
    """Run this rank's part of every cell; rank 0 returns the results, other ranks None."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "run")
    base = Path(os.environ.get("COMPAT_WORKDIR", tempfile.gettempdir())) / f"compat-{run_id}"
    versions = installed_versions()
    results = []
    for cell in cells:
        start = time.monotonic()
        expected = expectations.status_for(cell.id, versions)
        sizes = {cell.layout.world_size, cell.load_layout.world_size}
        if sizes != {world}:
            reason = f"world_size {'/'.join(map(str, sorted(sizes)))} != WORLD_SIZE {world} of this launch"
            results.append(CellResult.of(cell, "unsupported", reason, 0.0, expected))
            continue
        root = base / cell.id
        root.mkdir(parents=True, exist_ok=True)
        phases = ["save", "load"] if cell.reshards else ["roundtrip"]
        status, reason, metrics = "pass", "", {}
        for phase in phases:
            task = {"cell": cell.to_dict(), "phase": phase, "root": str(root), "backend": backend, "timeout": timeout}
            record = run_task(task, rank, world, local_rank)
            path = result_path(root, phase, rank)
            path.write_text(json.dumps(record, default=str))
            if rank != 0:
                if record["status"] != "pass":
                    break
                continue
            paths = [result_path(root, phase, r) for r in range(world)]
            _wait_for(paths, timeout)
            outcomes = [
                RankOutcome(r, 0, json.loads(p.read_text()) if p.exists() else None, "") for r, p in enumerate(paths)
            ]
            status, reason, metrics = verdict(outcomes, "" if all(p.exists() for p in paths) else "timed out", phase)
            if status != "pass":
                break
        if rank == 0:
            results.append(CellResult.of(cell, status, reason, time.monotonic() - start, expected, metrics))
    return results if rank == 0 else None
