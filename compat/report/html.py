"""A results.json as one self-contained HTML page: run header, counts, heatmap, and a table of cells.

For CI artifacts and mail: a single file that opens anywhere, with no scripts or external assets, and
every failure reason one click away instead of spilled across a Markdown table. All text from the results
(reasons are tracebacks and model output) is escaped.
"""

from __future__ import annotations

import base64
from collections import Counter
from html import escape
from pathlib import Path
from typing import Any

from compat.report.vocabulary import column_label, headline, outcome, status_text
from compat.results.skips import coverage_mark, coverage_note, skip_mark, skip_note

__all__ = ["html_report"]

_STATUSES = ("pass", "fail", "error", "unsupported")

_CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #1d1d1d; }
h1 { font-size: 1.35em; margin: 0 0 .3em; }
.meta { color: #444; margin: .15em 0; }
.warn { background: #fde2e1; border: 1px solid #d62728; padding: .5em .8em; margin: .6em 0; }
.counts span { display: inline-block; padding: .15em .6em; margin: .3em .3em 0 0; border-radius: 3px; }
img.heatmap { max-width: 100%; border: 1px solid #ddd; margin: 1em 0; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border: 1px solid #d0d0d0; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; position: sticky; top: 0; }
th.sorted::after { content: " \\25B4"; color: #888; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.id { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: nowrap; }
details summary { cursor: pointer; max-width: 60em; }
details pre { white-space: pre-wrap; max-width: 90em; background: #f7f7f7; padding: .5em; margin: .3em 0; }
.o-pass { background: #8fd19e; }
.o-expected-fail { background: #f6c85f; }
.o-expected-error { background: #b8b8b8; }
.o-unsupported { background: #e4e4e4; }
.o-unmet { background: #d62728; color: #fff; font-weight: bold; }
"""


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _counts(cells: list[dict[str, Any]]) -> str:
    by_status = Counter(c.get("status", "?") for c in cells)
    met = sum(bool(c.get("met")) for c in cells)
    klass = {"pass": "o-pass", "fail": "o-expected-fail", "error": "o-expected-error", "unsupported": "o-unsupported"}
    parts = [f'<span class="{klass.get(s, "")}">{by_status.get(s, 0)} {escape(s)}</span>' for s in _STATUSES]
    parts += [f"<span>{n} {escape(s)}</span>" for s, n in sorted(by_status.items()) if s not in _STATUSES]
    parts.append(f'<span class="o-pass">{met} met</span>')
    parts.append(f'<span class="{"o-unmet" if met < len(cells) else "o-pass"}">{len(cells) - met} unmet</span>')
    return f'<p class="counts"><b>{len(cells)} cells:</b> {" ".join(parts)}</p>'


def _reason(cell: dict[str, Any]) -> str:
    """A non-pass (or unmet) cell's reason, folded: the first line as summary, the whole text inside."""
    reason = (cell.get("reason") or "").strip()
    expected_reason = (cell.get("expected_reason") or "").strip()
    if cell.get("status") == "pass" and cell.get("met", False):
        note = skip_note(cell)
        return (
            f"<details><summary>{escape(headline(note, 160))}</summary><p>{escape(note)}</p></details>" if note else ""
        )
    if not reason and not expected_reason:
        return ""
    summary = escape(headline(reason or expected_reason, 160))
    body = f"<pre>{escape(reason)}</pre>" if reason else ""
    if expected_reason:
        body += f"<p><b>expected {escape(str(cell.get('expected', '')))} because:</b> {escape(expected_reason)}</p>"
    return f"<details><summary>{summary}</summary>{body}</details>"


_HEAD = (
    "cell",
    "family",
    "layout",
    "world",
    "adapter",
    "dtype",
    "spec",
    "status",
    "expected",
    "max diff",
    "effect",
    "judged",
    "seconds",
    "served",
    "reason",
)


def _served(cell: dict[str, Any]) -> str:
    """Each serving engine's check of the cell (``serving.ENGINE``): its status, max diff of log-probs
    against Megatron's, the adapter's effect, and its problems folded; ``-`` for a cell not served."""
    parts = []
    for engine, s in (cell.get("serving") or {}).items():
        klass = "o-pass" if s.get("status") == "pass" else f"o-{outcome(cell)}"
        figures = f"max diff {_num(s.get('max_abs_diff'))}, effect {_num(s.get('adapter_effect'))}"
        text = f'<span class="{klass}">{escape(str(s.get("engine", engine)))}: {escape(str(s.get("status")))}</span>'
        problems = [str(p) for p in s.get("problems") or []]
        if problems:
            items = "".join(f"<li>{escape(p)}</li>" for p in problems)
            text += (
                f"<details><summary>{figures}; {escape(headline(problems[0], 160))}</summary><ul>{items}</ul></details>"
            )
        else:
            text += f" {figures}"
        parts.append(f"<div>{text}</div>")
    return "".join(parts) or "-"


def _row(cell: dict[str, Any]) -> str:
    status = escape(status_text(str(cell.get("status", "?")) + skip_mark(cell), bool(cell.get("met"))))
    values = [
        f'<td class="id">{escape(str(cell.get("id", "?")))}</td>',
        f"<td>{escape(str(cell.get('family', '?')))}</td>",
        f"<td>{escape(column_label(cell))}</td>",
        f'<td class="num">{escape(str(cell.get("world_size", "")))}</td>',
        f"<td>{escape(str(cell.get('adapter', 'lora')))}</td>",
        f"<td>{escape(str(cell.get('dtype', 'fp32')))}</td>",
        f"<td>{escape(str(cell.get('spec', 'local')))}</td>",
        f'<td class="o-{outcome(cell)}">{status}</td>',
        f"<td>{escape(str(cell.get('expected', '')))}</td>",
        f'<td class="num">{_num(cell.get("max_abs_diff"))}</td>',
        f'<td class="num">{_num(cell.get("adapter_effect"))}</td>',
        f'<td class="num" title="{escape(coverage_note(cell))}">{escape(coverage_mark(cell))}</td>',
        f'<td class="num">{float(cell.get("seconds") or 0):.1f}</td>',
        f"<td>{_served(cell)}</td>",
        f"<td>{_reason(cell)}</td>",
    ]
    return "<tr>" + "".join(values) + "</tr>"


def html_report(data: dict[str, Any], source: str, heatmap_png: Path | None = None) -> str:
    """The page for ``data`` (a results.json read from ``source``); ``heatmap_png`` is embedded if given.

    Cells that missed their expected outcome come first, then the rest in the file's order: the table is
    static (no JavaScript), so its order is what a reader needs first.
    """
    cells = list(data.get("cells", []))
    versions = ", ".join(f"{escape(str(k))} {escape(str(v))}" for k, v in (data.get("versions") or {}).items())
    te = data.get("transformer_engine")
    title = f"LoRA compat results: {data.get('device', '?')}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta"><b>source:</b> {escape(source)}</p>',
        f'<p class="meta"><b>device:</b> {escape(str(data.get("device", "?")))}; '
        f"<b>backend:</b> {escape(str(data.get('backend', '?')))}; "
        f"<b>finished:</b> {escape(str(data.get('finished_at') or 'unknown'))}</p>",
        f'<p class="meta"><b>versions:</b> {versions or "unknown"}; '
        f"<b>transformer_engine:</b> {escape(str(te)) if te else 'not installed'}</p>",
    ]
    if not data.get("complete", True):
        parts.append('<p class="warn"><b>Incomplete run:</b> it stopped before every cell ran.</p>')
    parts.append(_counts(cells))
    if heatmap_png is not None:
        encoded = base64.b64encode(Path(heatmap_png).read_bytes()).decode("ascii")
        parts.append(f'<img class="heatmap" alt="heatmap of cell outcomes" src="data:image/png;base64,{encoded}">')
    ordered = sorted(cells, key=lambda c: bool(c.get("met", False)))  # stable: unmet first, file order kept
    head = "".join('<th class="sorted">status</th>' if n == "status" else f"<th>{n}</th>" for n in _HEAD)
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>")
    parts += [_row(c) for c in ordered]
    parts += ["</tbody></table>", "</body></html>"]
    return "\n".join(parts) + "\n"
