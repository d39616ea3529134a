"""The same cells across runs, one column per run: local spec against TE, CPU against GPU.

A cell is the same cell in two runs when its family, layout (saved and loaded at), adapter and dtype
agree; the layer spec is what a side-by-side view usually varies, so it is not part of the key. Rows are
the first run's cells (the run under study); a row whose outcomes differ gets each non-passing reason.
"""

from __future__ import annotations

from typing import Any

from compat.report.vocabulary import column_label, headline, short_status

__all__ = ["cell_key", "side_by_side"]


def cell_key(cell: dict[str, Any]) -> tuple[str, str, str, str]:
    """What makes two results the same cell, whatever their layer spec or machine."""
    return (cell["family"], column_label(cell), cell.get("adapter", "lora"), cell.get("dtype", "fp32"))


def _square(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    diff = cell.get("max_abs_diff")
    return short_status(cell) + ("" if diff is None else f" {diff:.1e}")


def side_by_side(runs: list[dict[str, Any]], labels: list[str]) -> str:
    """Markdown: one row per cell of ``runs[0]``, one column per run (status and max |logit diff|).

    Where the outcomes differ (status, or met against expected), the row cites each non-passing run's
    reason as a footnote, shared by the rows that have the same one.
    """
    by_key = [{cell_key(c): c for c in run.get("cells", [])} for run in runs]
    lines = [
        "| cell | " + " | ".join(labels) + " | why they differ |",
        "| --- | " + " | ".join("---" for _ in labels) + " | --- |",
    ]
    notes: dict[str, int] = {}
    differ = 0
    for cell in runs[0].get("cells", []):
        same = [table.get(cell_key(cell)) for table in by_key]
        ran = [c for c in same if c is not None]
        why = ""
        if len({(c["status"], c.get("met", False)) for c in ran}) > 1:
            differ += 1
            why = ", ".join(
                f"{label} [{notes.setdefault(headline(c['reason']) or '(no reason given)', len(notes) + 1)}]"
                for label, c in zip(labels, same, strict=True)
                if c is not None and (c["status"] != "pass" or not c.get("met", False))
            )
        lines.append(f"| {cell['id']} | " + " | ".join(_square(c) for c in same) + f" | {why} |")
    lines += ["", f"{len(runs[0].get('cells', []))} cells; {differ} with outcomes that differ between runs."]
    if notes:
        lines += ["", "Reasons (first line):", ""]
        lines += [f"{n}. {text.replace('|', '/')}" for text, n in notes.items()]
    return "\n".join(lines) + "\n"
