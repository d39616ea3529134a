"""Results: one record per cell, and ``results.json`` in the shape of the contract (docs/contract.md)."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from compat.checks.problems import Problem
from compat.checks.upstream import relative_paths
from compat.declare.cells import DEFAULT_SPEC, Cell
from compat.declare.expected import Expected

__all__ = ["CellResult", "device_name", "expected_patterns", "read_results", "write_results"]


@dataclass
class CellResult:
    id: str
    family: str
    layout: dict[str, int]
    load_layout: dict[str, int]
    world_size: int
    adapter: str
    dtype: str
    spec: str
    status: str
    expected: str
    met: bool
    max_abs_diff: float | None
    adapter_effect: float | None
    seconds: float
    reason: str
    expected_reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    serving: dict[str, Any] = field(default_factory=dict)  # per engine: status, max diff, effect, problems
    files: str | None = None  # where the cell's files were kept (an outcome other than expected)
    problems: list[dict[str, Any]] = field(default_factory=list)  # {check, message, where[, tensors]}: the reason
    expected_matches: list[str] = field(default_factory=list)  # the expectation's patterns (its ``match``)
    unmet: list[str] = field(default_factory=list)  # why not met: a status, a problem not expected, a pattern not seen

    @classmethod
    def of(
        cls,
        cell: Cell,
        status: str,
        reason: str,
        seconds: float,
        expected: Expected,
        metrics: dict[str, Any] | None = None,
        problems: list[Problem] | None = None,
    ) -> CellResult:
        metrics = metrics or {}
        reason = relative_paths(reason)  # what is matched is what is written and shown
        problems = [replace(p, message=relative_paths(p.message)) for p in problems or []]
        unmet = expected.unmet(status, problems)
        return cls(
            id=cell.id,
            family=cell.family,
            layout=cell.layout.as_dict(),
            load_layout=cell.load_layout.as_dict(),
            world_size=cell.world_size,
            adapter=cell.adapter,
            dtype=cell.dtype,
            spec=cell.spec,
            status=status,
            expected=expected.status,
            met=not unmet,
            max_abs_diff=metrics.get("max_abs_diff"),
            adapter_effect=metrics.get("adapter_effect"),
            seconds=round(seconds, 2),
            reason=reason,
            expected_reason=expected.reason,
            metrics={k: v for k, v in metrics.items() if k not in ("max_abs_diff", "adapter_effect", "serving")},
            problems=[p.as_dict() for p in problems],
            expected_matches=list(expected.match),
            unmet=unmet,
            serving=metrics.get("serving", {}),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellResult:
        """A record read back from results.json, of this release or an older one: keys it does not know are
        dropped, an older file's one ``expected_match`` pattern becomes ``expected_matches``, and a record from
        before layer specs is ``local``."""
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in data.items() if k in known}
        return cls(**{"spec": DEFAULT_SPEC, **given, "expected_matches": expected_patterns(data)})


def expected_patterns(cell: dict[str, Any]) -> list[str]:
    """The patterns a cell's record says its problems had to match: ``expected_matches``, or in a file written
    before that list existed, its one ``expected_match`` ("" for none)."""
    if "expected_matches" in cell:
        return list(cell["expected_matches"])
    old = cell.get("expected_match", "")
    return [old] if old else []


def _check_reasons(serving: dict[str, Any]) -> dict[str, str]:
    """``serving.ENGINE`` -> that check's problems, for expectations that name the check."""
    return {f"serving.{engine}": "; ".join(record.get("problems", [])) for engine, record in serving.items()}


def device_name(backend: str) -> str:
    if backend == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.system()})"


def write_results(
    path: Path,
    results: list[CellResult],
    backend: str,
    device: str,
    versions: dict[str, Any],
    complete: bool,
    selection: dict[str, Any] | None = None,
) -> None:
    """Write atomically: a run that stops half-way never leaves a half-written file.

    ``complete`` is false while cells are still to run (the file is rewritten after every cell):
    an interrupted run's file says so, and the gate refuses it. ``selection``: how the cells were
    chosen (matrix, ``-k``, shard), so a narrowed run reads as one.
    """
    data = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete": complete,
        "selection": selection or {},
        "device": device,
        "backend": backend,
        "versions": versions,
        "transformer_engine": _te_version(),
        "cells": [asdict(r) for r in results],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _te_version() -> str | None:
    from importlib import metadata

    for dist in ("transformer-engine", "transformer_engine"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def read_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
