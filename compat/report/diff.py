"""What changed between two results.json files: status flips, problems, skipped checks, cells added
or removed, max-diff jumps.

After a version bump or a fix, the question is "what moved", not "what is the state"; two full tables
side by side hide a single flipped cell among a hundred. Cells are matched by id. A max_abs_diff that
moves by an order of magnitude while the cell still passes is worth a look before it becomes a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from compat.checks.problems import problem_key
from compat.report.vocabulary import UNMET
from compat.results.skips import skipped_checks

__all__ = ["Diff", "DiffMove", "StatusChange", "diff", "diff_markdown"]


@dataclass(frozen=True)
class StatusChange:
    id: str
    old_status: str
    new_status: str
    old_met: bool
    new_met: bool


@dataclass(frozen=True)
class DiffMove:
    id: str
    old: float | None
    new: float | None

    @property
    def factor(self) -> float:
        """new / old; inf or 0 where one side is missing or zero (a crossing, not a ratio)."""
        if self.old is None or self.old == 0:
            return math.inf
        if self.new is None:
            return 0.0
        return self.new / self.old


@dataclass(frozen=True)
class Diff:
    status_changed: tuple[StatusChange, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    diff_moved: tuple[DiffMove, ...]
    versions_changed: tuple[tuple[str, str | None, str | None], ...]
    common: int
    factor: float
    problems_changed: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()  # (id, gone, new), same status
    skips_changed: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = ()  # (id, skipped before, now)

    @property
    def changed(self) -> bool:
        return bool(
            self.status_changed
            or self.added
            or self.removed
            or self.diff_moved
            or self.problems_changed
            or self.skips_changed
        )

    @property
    def outcome_changed(self) -> bool:
        """A cell changed status or problems: ``compat diff`` exits 1."""
        return bool(self.status_changed or self.problems_changed)

    @property
    def summary(self) -> str:
        """One line: counts of each kind of change, for logs and PR comments."""
        if not self.changed:
            return f"no changes in {self.common} common cells"
        newly_unmet = sum(c.old_met and not c.new_met for c in self.status_changed)
        newly_met = sum(c.new_met and not c.old_met for c in self.status_changed)
        parts = [
            f"{len(self.status_changed)} status change{_s(self.status_changed)}"
            f" ({newly_unmet} newly unmet, {newly_met} newly met)",
            f"{len(self.added)} added",
            f"{len(self.removed)} removed",
            f"{len(self.diff_moved)} max-diff move{_s(self.diff_moved)} beyond {self.factor:g}x",
            f"{len(self.problems_changed)} with other problems",
            f"{len(self.skips_changed)} with other skipped checks",
        ]
        return "; ".join(parts) + f" ({self.common} common cells)"


def _s(items: tuple[Any, ...]) -> str:
    return "" if len(items) == 1 else "s"


def _moved(old: float | None, new: float | None, factor: float) -> bool:
    if old is None or new is None:
        return (old is None) != (new is None)
    if old == new:
        return False
    if old == 0 or new == 0:
        return True
    return max(abs(new / old), abs(old / new)) > factor


def diff(before: dict[str, Any], after: dict[str, Any], factor: float = 10.0) -> Diff:
    """Compare two results dicts cell by cell (keyed by id); a max diff counts if it moved > ``factor``-fold."""
    old = {c["id"]: c for c in before.get("cells", [])}
    new = {c["id"]: c for c in after.get("cells", [])}
    common = [i for i in new if i in old]
    changes = tuple(
        StatusChange(i, old[i]["status"], new[i]["status"], bool(old[i].get("met")), bool(new[i].get("met")))
        for i in common
        if (old[i]["status"], bool(old[i].get("met"))) != (new[i]["status"], bool(new[i].get("met")))
    )
    moves = tuple(
        DiffMove(i, old[i].get("max_abs_diff"), new[i].get("max_abs_diff"))
        for i in common
        if _moved(old[i].get("max_abs_diff"), new[i].get("max_abs_diff"), factor)
    )
    problems = []
    for i in common:
        a, b = (
            [problem_key(p) for p in old[i].get("problems") or []],
            [problem_key(p) for p in new[i].get("problems") or []],
        )
        if old[i]["status"] == new[i]["status"] and a != b and ("problems" in old[i]):
            problems.append((i, tuple(k for k in a if k not in b), tuple(k for k in b if k not in a)))
    skips = [
        (i, tuple(skipped_checks(old[i])), tuple(skipped_checks(new[i])))
        for i in common
        if skipped_checks(old[i]) != skipped_checks(new[i])
    ]
    v_old, v_new = before.get("versions") or {}, after.get("versions") or {}
    versions = tuple(
        (k, v_old.get(k), v_new.get(k)) for k in sorted(set(v_old) | set(v_new)) if v_old.get(k) != v_new.get(k)
    )
    return Diff(
        status_changed=changes,
        added=tuple(i for i in new if i not in old),
        removed=tuple(i for i in old if i not in new),
        diff_moved=moves,
        versions_changed=versions,
        common=len(common),
        factor=factor,
        problems_changed=tuple(problems),
        skips_changed=tuple(skips),
    )


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _met(flag: bool) -> str:
    return "met" if flag else UNMET


def diff_markdown(d: Diff, before_name: str = "before", after_name: str = "after", verbosity: int = 0) -> str:
    """``d`` as Markdown: the summary line first, then one table or list per kind of change.

    ``verbosity`` as ``-q``/``-v``: the summary line alone, or problems written whole (else cut at 300).
    """
    head = f"**{before_name} → {after_name}:** {d.summary}"
    if verbosity < 0:
        return head + "\n"
    cut = None if verbosity > 0 else 300
    lines = [head, ""]
    if d.versions_changed:
        lines.append("Versions: " + ", ".join(f"{k} {a or '-'} → {b or '-'}" for k, a, b in d.versions_changed))
        lines.append("")
    if d.status_changed:
        lines += ["| cell | status | expected outcome |", "| --- | --- | --- |"]
        lines += [
            f"| {c.id} | {c.old_status} → {c.new_status} | {_met(c.old_met)} → {_met(c.new_met)} |"
            for c in d.status_changed
        ]
        lines.append("")
    if d.diff_moved:
        lines += [f"Max diff moved more than {d.factor:g}x:", "", "| cell | before | after | factor |"]
        lines.append("| --- | --- | --- | --- |")
        for m in d.diff_moved:
            ratio = "new" if m.old is None else "gone" if m.new is None else f"{m.factor:.3g}x"
            lines.append(f"| {m.id} | {_num(m.old)} | {_num(m.new)} | {ratio} |")
        lines.append("")
    if d.problems_changed:
        lines += ["Other problems, same status:", ""]
        for i, gone, new in d.problems_changed:
            lines += [f"- `{i}`"] + [f"  - now: {k[:cut]}" for k in new] + [f"  - gone: {k[:cut]}" for k in gone]
        lines.append("")
    if d.skips_changed:
        lines += ["Other skipped checks:", "", "| cell | skipped before | skipped now |", "| --- | --- | --- |"]
        lines += [f"| {i} | {', '.join(a) or '-'} | {', '.join(b) or '-'} |" for i, a, b in d.skips_changed]
        lines.append("")
    for label, ids in (("Added", d.added), ("Removed", d.removed)):
        if ids:
            lines.append(f"{label} ({len(ids)}): " + ", ".join(f"`{i}`" for i in ids))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
