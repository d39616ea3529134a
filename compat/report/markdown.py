"""Results as Markdown, for docs and CI job summaries (what ``compat run`` prints is ``compat.report.terminal``).

It reads like the terminal: one row per cell, each problem spelled out once in the footnotes, a
summary at the end (counts, the cells' time, one line per unmet cell); ``-q`` keeps the summary only,
``-v`` adds each non-pass cell's whole reason (tracebacks included).
"""

from __future__ import annotations

from typing import Any

from compat.report.terminal import duration
from compat.report.vocabulary import UNMET, headline, status_text, unmet_line
from compat.report.vocabulary import cells as n_cells
from compat.results.record import expected_patterns
from compat.results.skips import skip_mark, skip_note

__all__ = ["markdown", "summary"]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _notes(texts: list[str], reasons: dict[str, int]) -> str:
    """``[1][3]``: each text's footnote number, a new text getting the next one."""
    return "".join(f"[{reasons.setdefault(t, len(reasons) + 1)}]" for t in texts)


def _serving_table(cells: list[dict[str, Any]], reasons: dict[str, int]) -> list[str]:
    """The served cells: each engine's own status, max diff of log-probs, adapter effect and problems."""
    rows = [(c["id"], e, s) for c in cells for e, s in c.get("serving", {}).items()]
    if not rows:
        return []
    lines = ["", "Served (log-probs against Megatron's, docs/serving.md):", ""]
    lines += ["| cell | engine | status | max diff | effect | seconds | problems |"]
    lines += ["| --- | --- | --- | --- | --- | --- | --- |"]
    for cell, engine, s in rows:
        seconds = s.get("seconds", {}).get("total")
        notes = _notes([headline(p) for p in s.get("problems", [])], reasons)
        row = (cell, s.get("engine", engine), s["status"], _num(s["max_abs_diff"]), _num(s["adapter_effect"]),
               "-" if seconds is None else f"{seconds:.0f}", notes)  # fmt: skip
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return lines


def summary(data: dict[str, Any], source: str = "") -> list[str]:
    """Counts, the cells' summed time (results.json holds no wall time), then each unmet cell."""
    cells = data.get("cells", [])
    counts: dict[str, int] = {}
    for c in cells:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    unmet = [c for c in cells if not c["met"]]
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    seconds = sum(float(c.get("seconds") or 0) for c in cells)
    lines = [
        f"{source + ': ' if source else ''}{n_cells(len(cells))} ({duration(seconds)} of cell time): {parts}; "
        f"{len(cells) - len(unmet)} met their expected outcome, {len(unmet)} {UNMET}."
    ]
    unmet_lines = [
        unmet_line(c["id"], c["expected"], expected_patterns(c), c["status"], c.get("reason", "")) for c in unmet
    ]
    return lines + ([""] + [f"- {line}" for line in unmet_lines] if unmet_lines else [])


def markdown(data: dict[str, Any], source: str = "", verbosity: int = 0) -> str:
    """A results.json as Markdown: the run, one row per cell, then each non-pass reason once, the summary.

    For job summaries and committed docs; reasons are shortened to (the start of) their first line and
    shared by the cells that have the same one. ``verbosity`` as ``-q``/``-v`` (module docstring).
    """
    if verbosity < 0:
        return "\n".join(summary(data, source)) + "\n"
    versions = ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items())
    lines = [
        f"{source + ': ' if source else ''}{data.get('device', '')}, {data.get('backend', '')} backend; {versions}",
        "",
        "| cell | world | status | expected | max diff | effect | seconds | reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    reasons: dict[str, int] = {}
    for c in data.get("cells", []):
        texts = ([headline(c["reason"])] if c["status"] != "pass" else []) + ([skip_note(c)] if skip_note(c) else [])
        status = status_text(c["status"] + skip_mark(c), c["met"])
        row = (c["id"], c["world_size"], status, c["expected"], _num(c["max_abs_diff"]),
               _num(c["adapter_effect"]), f"{c['seconds']:.0f}", _notes(texts, reasons))  # fmt: skip
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    lines += _serving_table(data.get("cells", []), reasons)
    if reasons:
        lines += ["", "Reasons (first line) and skipped checks:", ""]
        lines += [f"{n}. {text}" for text, n in reasons.items()]
    whole = [c for c in data.get("cells", []) if c["status"] != "pass" and c.get("reason")] if verbosity > 0 else []
    if whole:
        lines += ["", "Whole reasons:", ""]
        for c in whole:
            lines += [f"- `{c['id']}`:", "", "  ```", *("  " + x for x in c["reason"].strip().splitlines()), "  ```"]
    lines += ["", *summary(data)]
    return "\n".join(lines) + "\n"
