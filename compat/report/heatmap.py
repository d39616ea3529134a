"""One picture of a results.json: family x layout squares coloured by outcome, one panel per variant.

A table of a hundred cells hides its pattern (an architecture failing everywhere, one layout failing for
every MoE family); squares make it visible at a glance. Panels are (adapter, dtype, layer spec), since
those change what a cell tests; each panel shows only the families and layouts it ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compat.report.vocabulary import UNMET, column_label, outcome, slug_sort_key
from compat.results.skips import skipped_checks

__all__ = ["COLOURS", "heatmap", "panel_key"]

# Outcome -> (fill, text colour, legend label). Colour-blind-safe enough: red/green differ in lightness too,
# and every square also carries a status letter.
COLOURS: dict[str, tuple[str, str, str]] = {
    "pass": ("#8fd19e", "#10361b", "pass"),
    "expected-fail": ("#f6c85f", "#4a3500", "fail, expected"),
    "expected-error": ("#b8b8b8", "#202020", "error, expected"),
    "unsupported": ("#e4e4e4", "#404040", "unsupported"),
    "unmet": ("#d62728", "#ffffff", UNMET),
}
_NOT_RUN = "#ffffff"
_LETTER = {"pass": "P", "fail": "F", "error": "E", "unsupported": "U"}

# Sizes in inches / points: fixed per square, so a 20 x 20 panel is as legible as a 4 x 3 one.
_SQ_W, _SQ_H = 0.78, 0.46
_CHAR_W = 0.075  # width of a 9-pt tick-label character
_TITLE_CHAR_W = 0.1  # of an 11-pt bold panel-title character
_GAP_X, _GAP_Y, _MAX_W = 0.5, 0.3, 22.0
_DPI = 120


def panel_key(cell: dict[str, Any]) -> tuple[str, str, str]:
    """(adapter, dtype, spec) with the contract's defaults for files written before a field existed."""
    return (cell.get("adapter", "lora"), cell.get("dtype", "fp32"), cell.get("spec", "local"))


def _diff_text(x: float | None) -> str:
    if x is None:
        return "-"
    mantissa, _, exp = f"{x:.1e}".partition("e")
    return f"{mantissa}e{int(exp)}"


def _panels(cells: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    panels: dict[tuple[str, str, str], dict[str, Any]] = {}
    for cell in cells:
        key = panel_key(cell)
        p = panels.setdefault(key, {"title": " / ".join(key), "families": [], "columns": set(), "cells": {}})
        if cell["family"] not in p["families"]:
            p["families"].append(cell["family"])
        col = column_label(cell)
        p["columns"].add(col)
        p["cells"][(cell["family"], col)] = cell
    for p in panels.values():
        p["columns"] = sorted(p["columns"], key=slug_sort_key)
    # Plain LoRA fp32 first (the main matrix), then by size: big panels anchor the rows of the layout.
    order = sorted(panels, key=lambda k: (k != ("lora", "fp32", "local"), -len(panels[k]["cells"]), k))
    return {k: panels[k] for k in order}


def _box(p: dict[str, Any]) -> tuple[float, float, float, float]:
    """Panel (left margin, grid width, grid height, bottom margin) in inches."""
    left = 0.25 + _CHAR_W * max(len(f) for f in p["families"])
    bottom = 0.2 + 0.72 * _CHAR_W * max(len(c) for c in p["columns"])  # labels at 45 degrees
    return left, _SQ_W * len(p["columns"]), _SQ_H * len(p["families"]), bottom


def _place(panels: list[dict[str, Any]]) -> tuple[list[tuple[float, float]], float, float]:
    """Shelf-pack panels left to right; returns each panel's (x, y-from-top) and the figure size."""
    boxes = [_box(p) for p in panels]
    max_w = max(_MAX_W, *(b[0] + b[1] + _GAP_X for b in boxes))
    spots, x, y, shelf_h, width = [], 0.0, 0.0, 0.0, 0.0
    for p, (left, w, h, bottom) in zip(panels, boxes, strict=True):
        # the title starts above the grid and may be wider than it
        full_w = left + max(w, _TITLE_CHAR_W * len(p["title"])) + _GAP_X
        full_h = 0.45 + h + bottom + _GAP_Y  # 0.45: the panel title
        if x and x + full_w > max_w:
            x, y, shelf_h = 0.0, y + shelf_h, 0.0
        spots.append((x, y))
        x, shelf_h, width = x + full_w, max(shelf_h, full_h), max(width, x + full_w)
    return spots, width, y + shelf_h


def heatmap(data: dict[str, Any], path: Path) -> list[str]:
    """Write ``data`` (a results.json) as a PNG at ``path``; return the panel titles, in drawing order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    panels = _panels(data.get("cells", []))
    header_h = 1.25
    if not panels:
        fig = plt.figure(figsize=(6, 1.5))
        fig.text(0.5, 0.5, "no cells in this results file", ha="center", va="center", fontsize=12)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return []
    spots, width, height = _place(list(panels.values()))
    fig_w, fig_h = max(width, 9.0), height + header_h
    fig = plt.figure(figsize=(fig_w, fig_h))
    titles = []
    for p, (x0, y0) in zip(panels.values(), spots, strict=True):
        left, w, h, _ = _box(p)
        ax = fig.add_axes(((x0 + left) / fig_w, 1 - (header_h + y0 + 0.45 + h) / fig_h, w / fig_w, h / fig_h))
        cols, fams = p["columns"], p["families"]
        for i, fam in enumerate(fams):
            for j, col in enumerate(cols):
                cell = p["cells"].get((fam, col))
                if cell is None:
                    ax.add_patch(Rectangle((j, i), 1, 1, facecolor=_NOT_RUN, edgecolor="#dddddd", hatch="//"))
                    continue
                fill, ink, _ = COLOURS[outcome(cell)]
                ax.add_patch(Rectangle((j, i), 1, 1, facecolor=fill, edgecolor="white", linewidth=1.5))
                letter = _LETTER.get(cell.get("status", ""), "?") + ("" if cell.get("met") else "!")
                letter += f"~{len(skipped_checks(cell))}" if skipped_checks(cell) else ""  # checks skipped
                label = f"{letter} {_diff_text(cell.get('max_abs_diff'))}"
                weight = "normal" if cell.get("met") else "bold"
                ax.text(j + 0.5, i + 0.5, label, ha="center", va="center", fontsize=8, color=ink, weight=weight)
        plain = [j for j, c in enumerate(cols) if ".to." not in c]
        if plain and len(plain) < len(cols):  # separate resharding columns from same-layout ones
            ax.axvline(len(plain), color="#333333", linewidth=2)
            ax.text(
                len(plain) + 0.05,
                -0.12,
                "resharding: saved at <layout>.to.<loaded at>",
                fontsize=9,
                style="italic",
                va="bottom",
                color="#333333",
            )
        ax.set_xlim(0, len(cols))
        ax.set_ylim(len(fams), 0)
        ax.set_xticks([j + 0.5 for j in range(len(cols))], cols, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks([i + 0.5 for i in range(len(fams))], fams)
        ax.tick_params(length=0, labelsize=9)
        for side in ax.spines.values():
            side.set_visible(False)
        title = p["title"]
        ax.set_title(title, fontsize=11, weight="bold", loc="left", pad=6)
        titles.append(title)
    _header(fig, data, fig_h, Patch)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return titles


def _header(fig: Any, data: dict[str, Any], fig_h: float, patch: Any) -> None:
    cells = data.get("cells", [])
    unmet = sum(not c.get("met", False) for c in cells)
    when = data.get("finished_at") or "unknown time"
    done = "" if data.get("complete", True) else "  (INCOMPLETE RUN)"
    head = f"{data.get('device', '?')}, {data.get('backend', '?')} backend, {when}{done}"
    skipped = sum(bool(skipped_checks(c)) for c in cells)
    sub = (
        f"{len(cells)} cells, {unmet} {UNMET}, {skipped} with skipped checks.  "
        "Square: status letter (~N: N checks skipped) + max |logit diff|"
    )
    fig.text(0.01, 1 - 0.25 / fig_h, head, fontsize=13, weight="bold", va="top")
    fig.text(0.01, 1 - 0.55 / fig_h, sub, fontsize=9.5, va="top", color="#333333")
    handles = [patch(facecolor=fill, edgecolor="#999999", label=label) for fill, _, label in COLOURS.values()]
    handles.append(patch(facecolor=_NOT_RUN, edgecolor="#999999", hatch="//", label="not run"))
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.01, 1 - 0.8 / fig_h),
        ncols=len(handles),
        fontsize=9,
        frameon=False,
        handlelength=1.5,
        columnspacing=1.2,
    )
