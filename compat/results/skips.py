"""A cell's skipped checks, wherever the results record them, for every view that shows results.

A cell that passed with a check skipped vouches for less than one that ran them all: each view
(terminal table, Markdown, HTML, heatmap, gate, diff) shows the count and the reasons.
"""

from __future__ import annotations

from typing import Any

__all__ = ["coverage_mark", "coverage_note", "skip_mark", "skip_note", "skip_reasons", "skipped_checks"]


def skip_reasons(cell: dict[str, Any]) -> dict[str, str]:
    """Check name -> why it was skipped: ``metrics.skipped_checks`` and merged forms ``skipped``."""
    metrics = cell.get("metrics") or {}
    out = dict(metrics.get("skipped_checks") or {})
    for name, form in (metrics.get("merged") or {}).items():
        if form.get("status") == "skipped":
            out[name] = form.get("reason") or ""
    return out


def skipped_checks(cell: dict[str, Any]) -> list[str]:
    """The names of a cell's skipped checks (an accepted-results cell keeps them as ``skipped``)."""
    return sorted(skip_reasons(cell)) if "metrics" in cell else list(cell.get("skipped") or [])


def skip_note(cell: dict[str, Any]) -> str:
    """``2 checks skipped: name (why); name (why)``, or "" when none was."""
    reasons = skip_reasons(cell)
    if not reasons:
        return ""
    return f"{len(reasons)} check{'s' if len(reasons) > 1 else ''} skipped: " + "; ".join(
        f"{name} ({why})" for name, why in sorted(reasons.items())
    )


def skip_mark(cell: dict[str, Any]) -> str:
    """`` (2 skipped)`` after a status, or "": what a table cell or a grid square shows."""
    n = len(skipped_checks(cell))
    return f" ({n} skipped)" if n else ""


def coverage_mark(cell: dict[str, Any]) -> str:
    """``64/64``: the adapted weights some per-module oracle judged, of those the cell adapts; ``-`` where
    no oracle ran (a cell that stopped before them)."""
    cov = (cell.get("metrics") or {}).get("coverage") or cell.get("coverage")
    if not cov:
        return "-"
    return f"{cov['weights'] - len(cov.get('unjudged') or {})}/{cov['weights']}"


def coverage_note(cell: dict[str, Any]) -> str:
    """``judged 64 of 64 adapted weights: delta at rest 64, in flight, Megatron 64, in flight, peft 16``."""
    cov = (cell.get("metrics") or {}).get("coverage") or cell.get("coverage")
    if not cov:
        return ""
    each = "; ".join(f"{oracle} {n}" for oracle, n in cov.get("judged", {}).items())
    unjudged = cov.get("unjudged") or {}
    return f"judged {cov['weights'] - len(unjudged)} of {cov['weights']} adapted weights ({each})" + (
        f"; by no oracle: {', '.join(sorted(unjudged)[:3])}" if unjudged else ""
    )
