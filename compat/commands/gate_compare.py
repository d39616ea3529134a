"""The gate's verdict: a run's results against the accepted ones and the expectations, its terminal
lines (one per cell it flags, then a summary; details with ``-v``) and its Markdown (``--summary``).

What the gate cannot vouch for fails it (``failing``): per cell its status, its problems tensor by
tensor, its skipped checks (names and reasons) and the oracles' coverage, and the kind of device the
results were accepted on. ``compat.commands.gate`` builds the environment and runs the matrix.
"""

from __future__ import annotations

from typing import Any

from compat.checks.problems import keyed_tensors
from compat.declare.cells import selects
from compat.declare.pin_sets import GateError
from compat.report.vocabulary import UNMET, headline
from compat.results.baseline import coverage_of, device_kind, skips_of
from compat.results.skips import skipped_checks

__all__ = ["GateError", "check_complete", "compare", "failing", "markdown", "terminal"]

# What each kind of flagged cell is called, in the Markdown table's verdict and on the terminal.
_WORDS = {"regressions": "REGRESSION", "unmet": UNMET, "changed": "CHANGED", "problems": "PROBLEMS CHANGED",
          "skips": "SKIPS CHANGED", "coverage": "COVERAGE CHANGED", "device": "DEVICE CHANGED",
          "fixes": "fixed", "new": "new", "dropped": "DROPPED"}  # fmt: skip
# What fails the gate unless ``--accept`` records it (unmet and dropped cells and another kind of device fail
# it always: ``--accept`` refuses a run with any of them, ``compat.commands.gate``).
_ACCEPTABLE = ("regressions", "changed", "problems", "skips", "coverage")


def check_complete(results: dict[str, Any], where: str) -> None:
    """A run that stopped before every cell ran (interrupted, killed) is no verdict: GateError."""
    if results.get("complete") is not True:
        raise GateError(f"the run stopped before every cell ran ({where} is not marked complete): no verdict")


def compare(
    results: dict[str, Any],
    accepted: dict[str, Any] | None,
    forgetting: frozenset[str] = frozenset(),
    select: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Sort cells into regressions, fixes, new, changed (other status changes), unmet (by status or
    problems, against the expectations), problems (other problems or tensors than accepted), skips
    (checks skipped otherwise than accepted: a cell without accepted results has none accepted),
    coverage (other than accepted, numbers masked; compared where the accepted cell has it), device
    (the run's kind of device is not the accepted one's) and dropped (accepted, not run, neither forgotten
    nor being forgotten: ``forgetting``, though ``-k`` (``select``) selects it); ``unselected``: the accepted
    cells ``-k`` left out, counted, not flagged."""
    before = {c["id"]: c for c in (accepted or {}).get("cells", [])}
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in _WORDS}
    seen = set()
    for c in results.get("cells", []):
        seen.add(c["id"])
        then = before.get(c["id"])
        prev = then["status"] if then else None
        row = {
            "id": c["id"],
            "status": c["status"],
            "expected": c["expected"],
            "accepted": prev,
            "reason": c.get("reason") or "",
            "unmet": c.get("unmet") or [],
        }
        if c["status"] != "pass" and (c["expected"] == "pass" or prev == "pass"):
            out["regressions"].append(row)
        elif c["status"] == "pass" and (c["expected"] != "pass" or (prev is not None and prev != "pass")):
            out["fixes"].append(row)
        elif prev is not None and prev != c["status"]:
            out["changed"].append(row)
        if not c.get("met", True):
            out["unmet"].append(row)
        if then is not None and prev == c["status"] and "problems" in then:
            gone, new = _problem_change(then["problems"] or [], c.get("problems") or [])
            if gone or new:
                out["problems"].append({**row, "gone": gone, "new": new})
        if accepted is not None and prev is None:
            out["new"].append(row)
        gone, new = _skip_change(skips_of(then) if then else {}, skips_of(c))
        if gone or new:
            out["skips"].append({**row, "gone": gone, "new": new})
        if then is not None and "coverage" in then and coverage_of(then) != coverage_of(c):
            out["coverage"].append({**row, "gone": [f"{coverage_of(then)}"], "new": [f"{coverage_of(c)}"]})
    accounted = seen | set((accepted or {}).get("forgotten") or {}) | forgetting
    missing = [i for i in before if i not in accounted]
    out["dropped"] = [{"id": i, "accepted": before[i]["status"]} for i in missing if selects(select, i)]
    out["unselected"] = [{"id": i} for i in missing if not selects(select, i)]
    if accepted is not None and device_kind(accepted.get("device")) != device_kind(results.get("device")):
        then, now = device_kind(accepted.get("device")), device_kind(results.get("device"))
        out["device"].append({"id": "(every cell)", "reason": "", "unmet": [],
                              "gone": [f"accepted on {then}"], "new": [f"ran on {now}"]})  # fmt: skip
    return out


def _problem_change(before: list[dict[str, Any]], now: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(problems accepted but gone, problems not accepted), tensor by tensor: a problem listing tensors
    (``Problem.tensors``) that lists one more than accepted is that tensor, named, under its key."""
    a, b = _tensors_by_key(before), _tensors_by_key(now)
    gone = [_listed(k, a[k] - b.get(k, set()), k not in b) for k in a if k not in b or a[k] - b[k]]
    new = [_listed(k, b[k] - a.get(k, set()), k not in a) for k in b if k not in a or b[k] - a[k]]
    return gone, new


def _tensors_by_key(problems: list[dict[str, Any]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in problems:
        key, tensors = keyed_tensors(p)
        out.setdefault(key, set()).update(tensors)
    return out


def _listed(key: str, tensors: set[str], whole: bool) -> str:
    """``key``, or ``key: 2 tensors: a, b`` where the problem is the same but its tensors are not."""
    if whole and not tensors:
        return key
    shown = sorted(tensors)
    more = f" (+{len(shown) - 8} more)" if len(shown) > 8 else ""
    return f"{key}: {len(shown)} tensor{'s' if len(shown) != 1 else ''}: {', '.join(shown[:8])}{more}"


def _skip_change(before: dict[str, str | None], now: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """(skips accepted but gone, skips not accepted) as ``name (why)``; a reason is compared where both
    files kept it (an accepted file of format 1 kept names only)."""

    def same(name: str) -> bool:
        if name not in before or name not in now:
            return False
        return None in (before[name], now[name]) or before[name] == now[name]

    gone = [f"{n} ({before[n]})" if before[n] else n for n in sorted(before) if not same(n)]
    new = [f"{n} ({now[n]})" if now[n] else n for n in sorted(now) if not same(n)]
    return gone, new


def failing(diff: dict[str, list[dict[str, Any]]], accept: bool) -> list[str]:
    """What the gate cannot vouch for, by kind: unmet and dropped cells and another kind of device always
    (``--accept`` refuses such a run: ``compat.commands.gate``); regressions, status changes, changed
    problems, skips and coverage unless they are being accepted."""
    kinds = ["unmet", "dropped", "device"] + ([] if accept else list(_ACCEPTABLE))
    return [k for k in kinds if diff[k]]


def _verdict(row: dict[str, Any], diff: dict[str, list[dict[str, Any]]]) -> str:
    found = [w for k, w in _WORDS.items() if k != "dropped" and any(r["id"] == row["id"] for r in diff.get(k, []))]
    return ", ".join(found) or "ok"


def _skips(c: dict[str, Any]) -> str:
    """A cell's skipped checks: the count, and the names (the reasons are in the results file)."""
    names = skipped_checks(c)
    return f"{len(names)} skipped: {', '.join(names)}" if names else ""


def markdown(
    name: str,
    results: dict[str, Any],
    accepted: dict[str, Any] | None,
    diff: dict[str, Any],
    timing: str,
    fails: list[str] | None = None,
) -> str:
    fails = fails or []
    versions = results.get("versions", {})
    lines = [
        f"## Gate `{name}`: " + (f"**fails: {', '.join(fails)}**" if fails else "passes"),
        "",
        ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {results.get('device', '')}",
        "",
        timing + (f"; {len(diff['unselected'])} accepted cells not selected by -k" if diff.get("unselected") else ""),
        "",
        "| cell | status | expected | accepted | verdict | max diff | checks skipped |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    accepted_status = {c["id"]: c["status"] for c in (accepted or {}).get("cells", [])}
    for c in results.get("cells", []):
        d = c.get("max_abs_diff")
        lines.append(
            f"| `{c['id']}` | {c['status']} | {c['expected']} | {accepted_status.get(c['id'], '-')} "
            f"| {_verdict(c, diff)} | {'-' if d is None else f'{d:.1e}'} | {_skips(c) or '-'} |"
        )
    if accepted is None:
        lines += ["", f"No accepted results for `{name}` yet (`--accept` writes them)."]
    for key, title in (
        ("regressions", "Regressions (expected or previously accepted pass, now not pass)"),
        ("fixes", "Fixes (expected or accepted not pass, now pass)"),
        ("new", "New cells (not in the accepted results)"),
        ("changed", "Other status changes"),
        ("unmet", "Cells that did not meet their expected outcome (status or problems)"),
        ("problems", "Other problems than accepted (same status), or other tensors"),
        ("skips", "Checks skipped otherwise than accepted"),
        ("coverage", "Oracle coverage other than accepted"),
        ("device", "Accepted on another kind of device"),
        ("dropped", "Cells in the accepted results that did not run"),
    ):
        if diff[key]:
            lines += ["", f"### {title}", ""]
            for r in diff[key]:
                extra = f" (was {r['accepted']})" if r.get("accepted") else ""
                now = f": {r['status']}, expected {r['expected']}" if "status" in r else ""
                lines.append(f"- `{r['id']}`{now}{extra}")
                lines += [f"  - {why}" for why in (r["unmet"] if key == "unmet" else [])]
                lines += [f"  - now: {k[:300]}" for k in r.get("new", [])]
                lines += [f"  - gone: {k[:300]}" for k in r.get("gone", [])]
                if key == "regressions" and r.get("reason"):
                    lines.append("  ```\n  " + r["reason"][:800].replace("\n", "\n  ") + "\n  ```")
    return "\n".join(lines) + "\n"


def _details(key: str, r: dict[str, Any]) -> list[str]:
    """What ``-v`` adds under a flagged cell: why it is unmet, its problems now and gone, a regression's reason."""
    lines = list(r["unmet"]) if key == "unmet" else []
    lines += [f"now: {k}" for k in r.get("new", [])] + [f"gone: {k}" for k in r.get("gone", [])]
    if key == "regressions" and r.get("reason"):
        lines.append(r["reason"].strip())
    return ["    " + x.replace("\n", "\n    ") for x in lines]


def terminal(
    name: str, results: dict[str, Any], diff: dict[str, Any], fails: list[str], timing: str, verbosity: int = 0
) -> list[str]:
    """The gate's last lines: one per flagged cell (kind, id, status, expected, what it was, its first
    problem), each with its details under it with ``-v``; then the verdict with the counts and times."""
    lines = []
    for key, word in _WORDS.items():
        for r in diff[key]:
            now = f": {r['status']}, expected {r['expected']}" if "status" in r else ""
            was = f" (was {r['accepted']})" if r.get("accepted") else ""
            gone = [f"gone: {g}" for g in r.get("gone", [])]
            first = (
                (r["unmet"] if key == "unmet" else [])
                + r.get("new", [])
                + gone
                + ([r["reason"]] if r.get("reason") else [])
            )
            lines.append(
                f"{word} {r['id']}{now}{was}" + (f": {headline(first[0], 160)}" if first and verbosity <= 0 else "")
            )
            lines += _details(key, r) if verbosity > 0 else []
    counts = ", ".join(f"{len(diff[k])} {k}" for k in _WORDS if diff[k])
    verdict = f"fails: {', '.join(fails)}" if fails else "passes"
    cells = len(results.get("cells", []))
    left = f"; {len(diff['unselected'])} accepted cells not selected by -k" if diff.get("unselected") else ""
    return [*lines, f"gate {name} {verdict}; {cells} cells" + (f" ({counts})" if counts else "") + f"{left}; {timing}"]
