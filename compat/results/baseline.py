"""The gate's accepted results (``matrix/pins/accepted/[DEVICE/]NAME.json``): what a cell vouched for when
a person accepted it, read back whatever format version wrote it.

Format 2 keeps, per cell: status, expected, met, the max diff and adapter effect, the problems (with
the tensors each lists), the skipped checks with their reasons, and the oracles' coverage where the
run measured it; per file: the pins, versions, device, the matrix it was accepted from, and the
cells a person took out of it (``forgotten``: id -> why), so a baseline never shrinks unsaid.
Format 1 (no ``format`` key, before issue 34) kept skipped checks by name only, no matrix, no
coverage: read as such, reasons and coverage unknown, so the gate compares what it can.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from compat.results.skips import skip_reasons

__all__ = ["FORMAT", "baseline_cell", "coverage_of", "device_kind", "read_baseline", "skips_of"]

FORMAT = 2

# A CPU's core count is the machine the runner got, not another kind of device.
_CORES = re.compile(r", \d+ cores")


def device_kind(device: str | None) -> str:
    """``NVIDIA H200 x1``, ``x86_64 CPU (Linux)``: what results from two machines must share to compare."""
    return _CORES.sub("", device or "unknown")


def coverage_of(cell: dict[str, Any]) -> Any:
    """The oracles' coverage a cell reports (``metrics.coverage``, or an accepted cell's ``coverage``), with
    every number masked: what was compared, not how far apart it was. None when not reported."""
    raw = (cell.get("metrics") or {}).get("coverage") if "metrics" in cell else cell.get("coverage")
    return None if raw is None else _masked(raw)


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "#"
    return value


def skips_of(cell: dict[str, Any]) -> dict[str, str | None]:
    """Skipped check -> why, of a result cell or an accepted one (None: a format-1 file kept no reason)."""
    if "metrics" in cell:
        return dict(skip_reasons(cell))
    skipped = cell.get("skipped") or {}
    return dict(skipped) if isinstance(skipped, dict) else dict.fromkeys(skipped)


def baseline_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """What an accepted file keeps of a result cell."""
    keep = ("id", "status", "expected", "met", "max_abs_diff", "adapter_effect", "problems")
    out = {**{k: cell.get(k) for k in keep}, "skipped": skips_of(cell)}
    coverage = (cell.get("metrics") or {}).get("coverage")
    if coverage is not None:
        out["coverage"] = coverage
    return out


def read_baseline(path: Path) -> dict[str, Any] | None:
    """The accepted file at ``path`` in format 2's shape (None when there is none)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data.setdefault("format", 1)
    data.setdefault("forgotten", {})
    data.setdefault("matrix", None)
    return data
