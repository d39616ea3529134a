"""A compact family x layout text grid of the last known status, for ``compat families``.

One long line per family stops being readable past a handful of layouts; a grid lets the eye run down a
column (one layout across all families) as well as along a row. The helpers here (layout slug, column
label, outcome class, a reason's headline) are shared with the heatmap and the reports so that all name a cell alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from math import lcm
from typing import Any

from compat.results.skips import skip_mark

__all__ = [
    "LAYOUT_KEYS",
    "UNMET",
    "cells",
    "column_label",
    "family_grid",
    "grid_from_results",
    "grid_report",
    "is_plain",
    "layout_slug",
    "left_out",
    "outcome",
    "short_status",
    "slug_sort_key",
    "status_text",
    "unmet_line",
]

LAYOUT_KEYS = ("tp", "sp", "pp", "dp", "ep", "etp", "vpp")
_OFF = {"sp": 0}  # an on/off key, written ``sp`` when on; every other key is a size, 1 when off

NOT_RUN = "-"
_SHORT = {"pass": "pass", "fail": "fail*", "error": "err*", "unsupported": "unsup"}
# The one spelling, in every view (terminal, Markdown, HTML, heatmap, gate): a cell whose outcome is
# not the one matrix/expected.toml gives it. Never a mark, a case or an emphasis of its own.
UNMET = "unmet"


def layout_slug(layout: dict[str, int] | None) -> str:
    """The id fragment of a layout (non-1 keys joined by '-', ``tp1`` if none), as ``Layout.slug`` writes it.

    Recomputed here rather than taken from ``compat.declare.layouts`` so that reports read any results file, even
    one whose layout the current ``Layout`` would reject.
    """
    layout = layout or {}
    parts = [
        "sp" if k == "sp" else f"{k}{layout[k]}"
        for k in LAYOUT_KEYS
        if int(layout.get(k, _OFF.get(k, 1))) != _OFF.get(k, 1)
    ]
    parts += [f"{k}{v}" for k, v in sorted(layout.items()) if k not in LAYOUT_KEYS and int(v) != 1]
    return "-".join(parts) or "tp1"


def column_label(cell: dict[str, Any]) -> str:
    """``tp2`` for a cell saved and loaded at one layout, ``tp2.to.tp1`` for a resharding cell."""
    save = layout_slug(cell.get("layout"))
    load = layout_slug(cell.get("load_layout") or cell.get("layout"))
    return save if load == save else f"{save}.to.{load}"


def _parse_slug(slug: str) -> tuple[Any, ...]:
    # World size, then simpler layouts first (fewer parallel dimensions, tp before pp before ep ...).
    values = dict.fromkeys(LAYOUT_KEYS, 1)  # sp counts as a dimension when on: 2 here, for ordering only
    for part in slug.split("-"):
        m = re.fullmatch(r"([a-z]+?)(\d+)", "sp2" if part == "sp" else part)
        if m and m.group(1) in values:
            values[m.group(1)] = int(m.group(2))
    tp, pp, dp, ep, etp = (values[k] for k in ("tp", "pp", "dp", "ep", "etp"))
    dims = [i for i, k in enumerate(LAYOUT_KEYS) if values[k] != 1]
    return (pp * lcm(tp * dp, ep * etp), len(dims), dims, [values[k] for k in LAYOUT_KEYS])


def slug_sort_key(label: str) -> tuple[Any, ...]:
    """Order columns: plain layouts by world size, simplest first; resharding columns after them."""
    save, sep, load = label.partition(".to.")
    return (bool(sep), _parse_slug(save), _parse_slug(load) if sep else (), label)


def is_plain(cell: dict[str, Any], adapters: tuple[str, ...] = ("lora",), spec: str = "local") -> bool:
    """The default cell of a family and layout on one layer spec: plain LoRA, fp32, no resharding."""
    return (
        cell.get("adapter", "lora") in adapters
        and cell.get("dtype", "fp32") == "fp32"
        and cell.get("spec", "local") == spec
        and ".to." not in column_label(cell)
    )


def outcome(cell: dict[str, Any]) -> str:
    """One of ``pass``, ``expected-fail``, ``expected-error``, ``unsupported``, ``unmet``: what a colour shows."""
    if not cell.get("met", False):
        return "unmet"
    status = cell.get("status", "")
    return {"pass": "pass", "fail": "expected-fail", "error": "expected-error"}.get(status, "unsupported")


def short_status(cell: dict[str, Any]) -> str:
    """``pass``, ``fail*`` (an expected non-pass), ``fail unmet`` (not the expected outcome);
    ``pass (1 skipped)``: a check did not run."""
    status = cell.get("status", "?")
    if cell.get("met", False):
        return _SHORT.get(status, status) + skip_mark(cell)
    return status_text(_SHORT.get(status, status).rstrip("*"), False) + skip_mark(cell)


def cells(n: int) -> str:
    """``1 cell``, ``92 cells``: a count of cells as every summary writes it."""
    return f"{n} cell" if n == 1 else f"{n} cells"


def status_text(status: str, met: bool) -> str:
    """A cell's status as every view writes it: ``fail``, or ``fail unmet`` when not the expected outcome."""
    return status if met else f"{status} {UNMET}"


def headline(reason: str, limit: int = 300) -> str:
    """A reason's first line, cut at ``limit`` characters with an ellipsis: what a table or footnote shows."""
    lines = reason.strip().splitlines()
    if not lines:
        return ""
    return lines[0][:limit] + ("…" if len(lines[0]) > limit else "")


def unmet_line(cell_id: str, expected: str, patterns: Sequence[str], status: str, reason: str, limit: int = 300) -> str:
    """``unmet ID: expected fail matching 'x', got pass``: a cell that missed, as every summary lists it
    (``patterns``: the expectation's ``match``; the first is shown, and how many more there are)."""
    more = f" (and {len(patterns) - 1} more)" if len(patterns) > 1 else ""
    wanted = expected + (f" matching {patterns[0]!r}{more}" if patterns else "")
    got = status + (f": {headline(reason, limit)}" if reason else "")
    return f"{UNMET} {cell_id}: expected {wanted}, got {got}"


def _newest_first_last(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Stable: runs without "finished_at" (older files) count as oldest, in the order given.
    return sorted(runs, key=lambda run: str(run.get("finished_at") or ""))


def grid_from_results(
    runs: list[dict[str, Any]], adapters: tuple[str, ...] = ("lora",), spec: str = "local"
) -> dict[str, dict[str, str]]:
    """family -> {layout slug -> short status} from results files; a newer run (``finished_at``) wins a cell.

    Only plain cells go in (see ``is_plain``): the grid answers "does this family work at this layout";
    adapter, dtype, other-spec and resharding variants are in ``compat report`` and the heatmap. A family
    that ran only variants keeps its (empty) row, so that it does not vanish from the listing.
    """
    rows: dict[str, dict[str, str]] = {}
    for run in _newest_first_last(runs):
        for cell in run.get("cells", []):
            row = rows.setdefault(cell["family"], {})
            if is_plain(cell, adapters, spec):
                row[column_label(cell)] = short_status(cell)
    return rows


def left_out(runs: list[dict[str, Any]], adapters: tuple[str, ...] = ("lora",), spec: str = "local") -> int:
    """How many distinct cell ids the grid leaves out (not plain), for its footer."""
    return len({c["id"] for run in runs for c in run.get("cells", []) if not is_plain(c, adapters, spec)})


def family_grid(rows: dict[str, dict[str, str]], footer: str = "", width: int = 120) -> str:
    """Families as rows, layouts as columns; columns wrap into blocks of at most ``width`` characters.

    A family with an empty mapping still gets a row (all ``-``): declared but never run.
    """
    columns = sorted({label for row in rows.values() for label in row}, key=slug_sort_key)
    fam_w = max([len("family"), *(len(f) for f in rows)])
    widths = {c: max(len(c), *(len(row.get(c, NOT_RUN)) for row in rows.values())) for c in columns}
    blocks: list[list[str]] = [[]]
    used = fam_w
    for c in columns:
        if blocks[-1] and used + 2 + widths[c] > width:
            blocks.append([])
            used = fam_w
        blocks[-1].append(c)
        used += 2 + widths[c]
    lines: list[str] = []
    for block in blocks:
        if lines:
            lines.append("")
        lines.append("  ".join(["family".ljust(fam_w), *(c.ljust(widths[c]) for c in block)]).rstrip())
        lines.append("  ".join(["-" * fam_w, *("-" * widths[c] for c in block)]))
        for family, row in rows.items():
            squares = (row.get(c, NOT_RUN).ljust(widths[c]) for c in block)
            lines.append("  ".join([family.ljust(fam_w), *squares]).rstrip())
    lines.append("")
    lines.append(f"* expected non-pass (matrix/expected.toml); {UNMET}: not the expected outcome; - not run")
    if footer:
        lines.append(footer)
    return "\n".join(lines) + "\n"


def grid_report(runs: list[dict[str, Any]], adapters: tuple[str, ...] = ("lora",), spec: str = "local") -> str:
    """The grid of ``runs`` on one layer spec, with a footer that counts what it leaves out, ready to print."""
    rows = grid_from_results(runs, adapters, spec)
    n = left_out(runs, adapters, spec)
    footer = (
        f"{n} other cell{'s' if n != 1 else ''} (other adapters, bf16, other spec or resharding) left out; "
        "see `compat report`"
        if n
        else ""
    )
    return family_grid(rows, footer)
