"""Results: one record per cell, ``results.json`` in the shape of CONTRACT.md, and the table."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from compat.cells import Cell

__all__ = ["CellResult", "format_header", "format_row", "markdown", "read_results", "summary", "write_results"]


@dataclass
class CellResult:
    id: str
    family: str
    layout: dict[str, int]
    load_layout: dict[str, int]
    world_size: int
    adapter: str
    dtype: str
    status: str
    expected: str
    met: bool
    max_abs_diff: float | None
    adapter_effect: float | None
    seconds: float
    reason: str
    expected_reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        cell: Cell,
        status: str,
        reason: str,
        seconds: float,
        expected: tuple[str, str],
        metrics: dict[str, Any] | None = None,
    ) -> CellResult:
        metrics = metrics or {}
        return cls(
            id=cell.id,
            family=cell.family,
            layout=cell.layout.as_dict(),
            load_layout=cell.load_layout.as_dict(),
            world_size=cell.world_size,
            adapter=cell.adapter,
            dtype=cell.dtype,
            status=status,
            expected=expected[0],
            met=status == expected[0],
            max_abs_diff=metrics.get("max_abs_diff"),
            adapter_effect=metrics.get("adapter_effect"),
            seconds=round(seconds, 2),
            reason=reason,
            expected_reason=expected[1],
            metrics={k: v for k, v in metrics.items() if k not in ("max_abs_diff", "adapter_effect")},
        )


def device_name(backend: str) -> str:
    if backend == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.system()})"


def write_results(path: Path, results: list[CellResult], backend: str, device: str, versions: dict[str, Any]) -> None:
    """Write atomically: a run that stops half-way never leaves a half-written file."""
    data = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "backend": backend,
        "versions": versions,
        # Transformer Engine is not installed here, so only the local layer spec runs.
        "transformer_engine": _te_version(),
        "layer_spec": "local",
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


_COLUMNS = (
    ("cell", 40),
    ("world", 5),
    ("status", 11),
    ("expected", 11),
    ("max diff", 9),
    ("effect", 9),
    ("seconds", 7),
)


def format_header() -> str:
    return "  ".join(name.ljust(width) for name, width in _COLUMNS)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_row(r: CellResult) -> str:
    mark = "" if r.met else " !"
    cells = (
        r.id,
        str(r.world_size),
        r.status + mark,
        r.expected,
        _num(r.max_abs_diff),
        _num(r.adapter_effect),
        f"{r.seconds:.1f}",
    )
    row = "  ".join(c.ljust(w) for c, (_, w) in zip(cells, _COLUMNS, strict=False))
    if r.reason and (not r.met or r.status != "pass"):
        row += "\n    " + r.reason.replace("\n", "\n    ")[:2000]
    return row


def summary(results: list[CellResult]) -> str:
    met = sum(r.met for r in results)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{len(results)} cells: {parts}; {met} met their expected outcome, {len(results) - met} did not"


def print_table(results: list[CellResult], out: IO[str]) -> None:
    print(format_header(), file=out)
    for r in results:
        print(format_row(r), file=out)
    print(summary(results), file=out)


def markdown(data: dict[str, Any], source: str = "") -> str:
    """A results.json as Markdown: the run, one row per cell, then each non-pass reason once.

    For job summaries and committed docs; reasons are shortened to (the start of) their first line and
    shared by the cells that have the same one.
    """
    versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
    lines = [
        f"{source + ': ' if source else ''}{data.get('device', '')}, {data.get('backend', '')} backend; {versions}",
        "",
        "| cell | world | status | expected | max diff | effect | seconds | reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    reasons: dict[str, int] = {}
    for c in data.get("cells", []):
        note = ""
        if c["status"] != "pass":
            first = c["reason"].strip().splitlines()[0][:300] if c["reason"].strip() else ""
            note = f"[{reasons.setdefault(first, len(reasons) + 1)}]"
        status = c["status"] + ("" if c["met"] else " (unexpected)")
        row = (c["id"], c["world_size"], status, c["expected"], _num(c["max_abs_diff"]),
               _num(c["adapter_effect"]), f"{c['seconds']:.0f}", note)  # fmt: skip
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    if reasons:
        lines += ["", "Reasons (first line):", ""]
        lines += [f"{n}. {text}" for text, n in reasons.items()]
    met = sum(c["met"] for c in data.get("cells", []))
    lines += ["", f"{len(data.get('cells', []))} cells, {met} met their expected outcome."]
    return "\n".join(lines) + "\n"
