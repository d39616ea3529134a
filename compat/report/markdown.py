"""Results as Markdown, for docs and CI job summaries (what ``compat run`` prints is ``compat.report.terminal``)."""

from __future__ import annotations

from typing import Any

from compat.report.vocabulary import UNMET, headline, status_text
from compat.results.skips import skip_mark, skip_note

__all__ = ["markdown"]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _serving_table(cells: list[dict[str, Any]]) -> list[str]:
    """The served cells: each engine's own status, max diff of log-probs and adapter effect."""
    rows = [(c["id"], e, s) for c in cells for e, s in c.get("serving", {}).items()]
    if not rows:
        return []
    lines = ["", "Served (log-probs against Megatron's, docs/serving.md):", ""]
    lines += ["| cell | engine | status | max diff | effect | seconds |", "| --- | --- | --- | --- | --- | --- |"]
    for cell, engine, s in rows:
        seconds = s.get("seconds", {}).get("total")
        row = (cell, s.get("engine", engine), s["status"], _num(s["max_abs_diff"]), _num(s["adapter_effect"]),
               "-" if seconds is None else f"{seconds:.0f}")  # fmt: skip
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return lines


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
        for text in ([headline(c["reason"])] if c["status"] != "pass" else []) + (
            [skip_note(c)] if skip_note(c) else []
        ):
            note += f"[{reasons.setdefault(text, len(reasons) + 1)}]"
        status = status_text(c["status"] + skip_mark(c), c["met"])
        row = (c["id"], c["world_size"], status, c["expected"], _num(c["max_abs_diff"]),
               _num(c["adapter_effect"]), f"{c['seconds']:.0f}", note)  # fmt: skip
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    lines += _serving_table(data.get("cells", []))
    if reasons:
        lines += ["", "Reasons (first line) and skipped checks:", ""]
        lines += [f"{n}. {text}" for text, n in reasons.items()]
    met = sum(c["met"] for c in data.get("cells", []))
    n = len(data.get("cells", []))
    lines += ["", f"{n} cells: {met} met their expected outcome, {n - met} {UNMET}."]
    return "\n".join(lines) + "\n"
