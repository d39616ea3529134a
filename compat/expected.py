"""Expected outcomes per cell and installed versions, read from ``matrix/expected.toml``.

A cell with no matching entry is expected to pass. An entry names cell ids (exact or fnmatch
patterns), optional version specifiers, the status it expects and why (an upstream issue, or
the file and line at fault). The first matching entry wins, so put narrow entries first.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from compat.versions import PACKAGES

__all__ = ["STATUSES", "Expectation", "Expectations", "ExpectedError", "load_expectations"]

STATUSES = ("pass", "fail", "error", "unsupported")
_KEYS = {"cells", "when", "status", "reason"}


class ExpectedError(ValueError):
    """A malformed expected-outcomes file."""


@dataclass(frozen=True)
class Expectation:
    cells: tuple[str, ...]
    status: str
    reason: str
    when: tuple[tuple[str, SpecifierSet], ...] = ()

    def matches(self, cell_id: str, versions: dict[str, str | None]) -> bool:
        if not any(fnmatchcase(cell_id, pattern) for pattern in self.cells):
            return False
        for package, spec in self.when:
            installed = versions.get(package)
            if installed is None or Version(installed) not in spec:
                return False
        return True


@dataclass(frozen=True)
class Expectations:
    entries: tuple[Expectation, ...] = ()

    def lookup(self, cell_id: str, versions: dict[str, str | None]) -> Expectation | None:
        return next((e for e in self.entries if e.matches(cell_id, versions)), None)

    def status_for(self, cell_id: str, versions: dict[str, str | None]) -> tuple[str, str]:
        """(expected status, why) for a cell on these versions; ("pass", "") without an entry."""
        entry = self.lookup(cell_id, versions)
        return (entry.status, entry.reason) if entry else ("pass", "")


def _parse_entry(raw: dict[str, Any], where: str) -> Expectation:
    unknown = set(raw) - _KEYS
    if unknown:
        raise ExpectedError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
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
    return Expectation(tuple(cells), status, reason, tuple(when))


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
