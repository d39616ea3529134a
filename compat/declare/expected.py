"""Expected outcomes per cell, layer spec and installed versions, read from ``matrix/expected.toml``.

A cell with no matching entry is expected to pass. An entry names cell ids (exact or fnmatch
patterns), optional version specifiers (``when``) and layer specs (``specs``, default every
spec), the status it expects and why (an upstream issue, or the file and line at fault), and
``match``: a regular expression, or a list of them, for the cell's problems: every problem must be
matched by one of them and every one of them must match a problem, so an expected failure that
starts failing for another reason, or for one more, is not met. The first matching entry wins:
narrow ones first. With ``checks``
(e.g. ``["serving.vllm"]``), each pattern must be seen in those checks' own problems (a serving
engine's own finding, not the peft check's).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from compat.checks.problems import Problem
from compat.declare.specs import SPECS
from compat.declare.suggest import key_hints
from compat.declare.versions import PACKAGES

__all__ = ["STATUSES", "Expectation", "Expectations", "Expected", "ExpectedError", "load_expectations"]

STATUSES = ("pass", "fail", "error", "unsupported")
_KEYS = {"cells", "when", "status", "reason", "match", "specs", "checks"}
CHECK_PREFIXES = ("serving.",)  # the checks an entry can name: serving.ENGINE


@dataclass(frozen=True)
class Expected:
    """What a cell is expected to do here: its status, why, and what its problems must say."""

    status: str = "pass"
    reason: str = ""
    match: tuple[str, ...] = ()  # regular expressions, together covering the problems (none: any problems)
    checks: tuple[str, ...] = ()  # where each pattern must be seen: these checks' problems (none: any)

    def unmet(self, status: str, problems: list[Problem]) -> list[str]:
        """Why the observed outcome is not the expected one: a status, a problem no pattern covers, a
        pattern no problem shows. Empty when met."""
        if status != self.status:
            return [f"status {status}, expected {self.status}"]
        if not self.match or status == "pass":
            return []
        seen = [p.text() for p in problems]
        out = [f"not expected: [{p.check}] {text[:300]}" for p, text in zip(problems, seen, strict=True)
               if not any(re.search(m, text, re.DOTALL) for m in self.match)]  # fmt: skip
        pool = [t for p, t in zip(problems, seen, strict=True) if not self.checks or p.check in self.checks]
        out += [f"expected, not seen: {m!r}" for m in self.match if not any(re.search(m, t, re.DOTALL) for t in pool)]
        return out

    def met_by(self, status: str, problems: list[Problem]) -> bool:
        """The observed status is the expected one, with the expected problems and no other."""
        return not self.unmet(status, problems)


class ExpectedError(ValueError):
    """A malformed expected-outcomes file."""


@dataclass(frozen=True)
class Expectation:
    cells: tuple[str, ...]
    status: str
    reason: str
    when: tuple[tuple[str, SpecifierSet], ...] = ()
    match: tuple[str, ...] = ()
    specs: tuple[str, ...] = SPECS
    checks: tuple[str, ...] = ()

    def matches(self, cell_id: str, versions: dict[str, str | None], spec: str = "local") -> bool:
        if spec not in self.specs or not any(fnmatchcase(cell_id, pattern) for pattern in self.cells):
            return False
        for package, specifier in self.when:
            installed = versions.get(package)
            if installed is None or Version(installed) not in specifier:
                return False
        return True


@dataclass(frozen=True)
class Expectations:
    entries: tuple[Expectation, ...] = ()

    def lookup(self, cell_id: str, versions: dict[str, str | None], spec: str = "local") -> Expectation | None:
        return next((e for e in self.entries if e.matches(cell_id, versions, spec)), None)

    def for_cell(self, cell_id: str, versions: dict[str, str | None], spec: str = "local") -> Expected:
        """What a cell is expected to do on these versions; a pass without an entry."""
        entry = self.lookup(cell_id, versions, spec)
        return Expected(entry.status, entry.reason, entry.match, entry.checks) if entry else Expected()


def _parse_entry(raw: dict[str, Any], where: str) -> Expectation:
    unknown = set(raw) - _KEYS
    if unknown:
        hints = key_hints(unknown, _KEYS)
        raise ExpectedError(f"{where}: unknown keys {sorted(unknown)}{hints}; allowed: {sorted(_KEYS)}")
    cells = raw.get("cells")
    if isinstance(cells, str):
        cells = [cells]
    if not cells or not all(isinstance(c, str) and c for c in cells):
        raise ExpectedError(f"{where}: 'cells' must be a cell id, a pattern, or a list of them")
    status = raw.get("status")
    if status not in STATUSES:
        raise ExpectedError(f"{where}: status {status!r} is not one of {', '.join(STATUSES)}")
    reason = raw.get("reason", "")
    if status != "pass" and not (isinstance(reason, str) and reason.strip()):
        raise ExpectedError(f"{where}: an expected {status!r} needs a reason (upstream file:line)")
    when = []
    for package, spec in (raw.get("when") or {}).items():
        if package not in PACKAGES:
            raise ExpectedError(f"{where}: 'when' names {package!r}; known: {', '.join(PACKAGES)}")
        try:
            when.append((package, SpecifierSet(spec)))
        except InvalidSpecifier:
            raise ExpectedError(f"{where}: {package} = {spec!r} is not a version specifier") from None
    match = raw.get("match", [])
    match = [match] if isinstance(match, str) else match
    if not isinstance(match, list) or not all(isinstance(m, str) and m for m in match):
        raise ExpectedError(f"{where}: 'match' must be a regular expression (a string) or a list of them")
    for pattern in match:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ExpectedError(f"{where}: match {pattern!r} is not a regular expression: {exc}") from None
    specs = raw.get("specs", list(SPECS))
    if not isinstance(specs, list) or not specs or not set(specs) <= set(SPECS):
        raise ExpectedError(f"{where}: 'specs' must be a non-empty list of {', '.join(SPECS)}")
    checks = raw.get("checks", [])
    if not isinstance(checks, list) or not all(isinstance(c, str) and c.startswith(CHECK_PREFIXES) for c in checks):
        raise ExpectedError(f"{where}: 'checks' must be a list of check names, e.g. [\"serving.vllm\"]")
    return Expectation(tuple(cells), status, reason, tuple(when), tuple(match), tuple(specs), tuple(checks))


def load_expectations(path: Path | None) -> Expectations:
    """Read and validate; a missing file means every cell is expected to pass."""
    if path is None or not path.exists():
        return Expectations()
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ExpectedError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"expect"}
    if unknown:
        raise ExpectedError(f"{path}: unknown top-level keys {sorted(unknown)}; use [[expect]]")
    entries = data.get("expect", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ExpectedError(f"{path}: 'expect' must be an array of tables: write [[expect]], not [expect]")
    return Expectations(tuple(_parse_entry(raw, f"{path} [[expect]] #{i + 1}") for i, raw in enumerate(entries)))
