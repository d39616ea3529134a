"""Results as Markdown, for docs and CI job summaries (what ``compat run`` prints is ``compat.terminal``)."""

from __future__ import annotations

from typing import Any

from compat.grid import UNMET, headline, status_text

__all__ = ["markdown"]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


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
            first = headline(c["reason"])
            note = f"[{reasons.setdefault(first, len(reasons) + 1)}]"
        status = status_text(c["status"], c["met"])
        row = (c["id"], c["world_size"], status, c["expected"], _num(c["max_abs_diff"]),
               _num(c["adapter_effect"]), f"{c['seconds']:.0f}", note)  # fmt: skip
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    if reasons:
        lines += ["", "Reasons (first line):", ""]
        lines += [f"{n}. {text}" for text, n in reasons.items()]
    met = sum(c["met"] for c in data.get("cells", []))
    n = len(data.get("cells", []))
    lines += ["", f"{n} cells: {met} met their expected outcome, {n - met} {UNMET}."]
    return "\n".join(lines) + "\n"
