"""Results as people read them: the table printed while cells run, and Markdown for docs and CI."""

from __future__ import annotations

from typing import IO, Any

from compat.grid import headline
from compat.results import CellResult
from compat.skips import skip_mark, skip_note

__all__ = ["format_header", "format_row", "markdown", "print_table", "summary"]

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
    skipped = {"metrics": r.metrics}
    mark += "~" if skip_note(skipped) else ""  # a check did not run (the note below says which and why)
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
    if skip_note(skipped):
        row += "\n    " + skip_note(skipped)
    for engine, s in r.serving.items():
        diff, effect = _num(s["max_abs_diff"]), _num(s["adapter_effect"])
        row += f"\n    serving.{engine}: {s['status']}, max diff {diff}, effect {effect}"
    return row


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


def summary(results: list[CellResult]) -> str:
    met = sum(r.met for r in results)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    skipped = sum(bool(skip_note({"metrics": r.metrics})) for r in results)
    return (
        f"{len(results)} cells: {parts}; {met} met their expected outcome, {len(results) - met} did not; "
        f"{skipped} with checks skipped"
    )


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
        for text in ([headline(c["reason"])] if c["status"] != "pass" else []) + (
            [skip_note(c)] if skip_note(c) else []
        ):
            note += f"[{reasons.setdefault(text, len(reasons) + 1)}]"
        status = c["status"] + skip_mark(c) + ("" if c["met"] else " (unexpected)")
        row = (c["id"], c["world_size"], status, c["expected"], _num(c["max_abs_diff"]),
               _num(c["adapter_effect"]), f"{c['seconds']:.0f}", note)  # fmt: skip
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    lines += _serving_table(data.get("cells", []))
    if reasons:
        lines += ["", "Reasons (first line) and skipped checks:", ""]
        lines += [f"{n}. {text}" for text, n in reasons.items()]
    met = sum(c["met"] for c in data.get("cells", []))
    lines += ["", f"{len(data.get('cells', []))} cells, {met} met their expected outcome."]
    return "\n".join(lines) + "\n"
