"""Expected outcomes per cell, layer spec and installed versions, read from ``matrix/expected.toml``.

A cell with no matching entry is expected to pass. An entry names cell ids (exact or fnmatch
patterns), optional version specifiers (``when``) and layer specs (``specs``, default every
spec), the status it expects and why (an upstream issue, or the file and line at fault), and
``match``: a regular expression, or a list of them, for the cell's problems: every problem must be
matched by one of them and every one of them must match a problem, so an expected failure that
starts failing for another reason, or for one more, is not met. An expected ``fail`` or ``error``
needs a ``match``. The first matching entry wins: narrow ones first. With ``checks``
(e.g. ``["serving.vllm"]``), each pattern must be seen in those checks' own problems (a serving
engine's own finding, not the peft check's).

A problem that lists tensors ("24 of the 64 modules ..., e.g. a, b": ``Problem.tensors`` holds all
of them) is matched only by a pattern that names them too, a table ``{ problem = "regex", tensors =
"regex" or ["name", ...], count = 24 }``: every listed tensor must match ``tensors`` (whole) or be
one of its names, and there must be ``count`` of them where given. So one more dropped expert is a
problem no expectation covers, whatever the message's "e.g." shows.
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
_PATTERN_KEYS = {"problem", "tensors", "count"}
CHECK_PREFIXES = ("serving.",)  # the checks an entry can name: serving.ENGINE
NEEDS_MATCH = ("fail", "error")  # an expected failure says which problems; an unsupported cell may not


@dataclass(frozen=True)
class Tensors:
    """The tensors a problem matched by a pattern may list: each matches ``names`` (a regular expression,
    whole) or is one of them (a tuple), and there are ``count`` of them where it is given."""

    names: str | tuple[str, ...]
    count: int | None = None

    def others(self, tensors: tuple[str, ...]) -> list[str]:
        """The listed tensors this does not name."""
        if isinstance(self.names, str):
            return [t for t in tensors if not re.fullmatch(self.names, t)]
        return [t for t in tensors if t not in self.names]

    def covers(self, tensors: tuple[str, ...]) -> bool:
        return bool(tensors) and not self.others(tensors) and self.count in (None, len(tensors))

    def why_not(self, tensors: tuple[str, ...]) -> str:
        """Why ``tensors`` is not what this names, as an unmet line ends."""
        if not tensors:
            return "it lists no tensors, the expectation names some"
        others, out = self.others(tensors), []
        if others:
            out.append(f"{len(others)} of its {len(tensors)} tensors are not named, e.g. {', '.join(others[:3])}")
        if self.count not in (None, len(tensors)):
            out.append(f"it lists {len(tensors)} tensors, expected {self.count}")
        return "; ".join(out)


@dataclass(frozen=True)
class Expected:
    """What a cell is expected to do here: its status, why, and what its problems must say."""

    status: str = "pass"
    reason: str = ""
    match: tuple[str, ...] = ()  # regular expressions, together covering the problems
    checks: tuple[str, ...] = ()  # where each pattern must be seen: these checks' problems (none: any)
    tensors: tuple[Tensors | None, ...] = ()  # per pattern of ``match``: the tensors it names (none: no tensors)

    def unmet(self, status: str, problems: list[Problem]) -> list[str]:
        """Why the observed outcome is not the expected one: a status, a problem no pattern covers (nor
        its tensors), a pattern no problem shows. Empty when met."""
        if status != self.status:
            return [f"status {status}, expected {self.status}"]
        if status == "pass" or (not self.match and status not in NEEDS_MATCH):
            return []
        if not self.match:
            return [f"expected {status} names no problem (no match): it would accept any; give it a match"]
        patterns = list(zip(self.match, self.tensors or (None,) * len(self.match), strict=True))
        out = []
        for p in problems:
            named = [spec for m, spec in patterns if re.search(m, p.text(), re.DOTALL)]
            if not any(_covers(spec, p.tensors) for spec in named):
                why = f" ({_why_not(named[0], p.tensors)})" if named else ""
                out.append(f"not expected: [{p.check}] {p.text()[:300]}{why}")
        pool = [p for p in problems if not self.checks or p.check in self.checks]
        out += [
            f"expected, not seen: {m!r}" + (f" (tensors {spec.names!r})" if spec else "")
            for m, spec in patterns
            if not any(re.search(m, p.text(), re.DOTALL) and _covers(spec, p.tensors) for p in pool)
        ]
        return out

    def met_by(self, status: str, problems: list[Problem]) -> bool:
        """The observed status is the expected one, with the expected problems and no other."""
        return not self.unmet(status, problems)


def _covers(spec: Tensors | None, tensors: tuple[str, ...]) -> bool:
    """A pattern naming no tensors covers only a problem that lists none."""
    return spec.covers(tensors) if spec else not tensors


def _why_not(spec: Tensors | None, tensors: tuple[str, ...]) -> str:
    return spec.why_not(tensors) if spec else f"it lists {len(tensors)} tensors, the expectation names none"


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
    tensors: tuple[Tensors | None, ...] = ()

    def expected(self) -> Expected:
        """What a cell this entry speaks for is expected to do."""
        return Expected(self.status, self.reason, self.match, self.checks, self.tensors)

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
        return entry.expected() if entry else Expected()


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
    match = [match] if isinstance(match, (str, dict)) else match
    if not isinstance(match, list) or not all((isinstance(m, str) and m) or isinstance(m, dict) for m in match):
        raise ExpectedError(
            f"{where}: 'match' must be a regular expression (a string), a table naming tensors, or a list of them"
        )
    patterns = [_parse_pattern(m, where) for m in match]
    specs = raw.get("specs", list(SPECS))
    if not isinstance(specs, list) or not specs or not set(specs) <= set(SPECS):
        raise ExpectedError(f"{where}: 'specs' must be a non-empty list of {', '.join(SPECS)}")
    checks = raw.get("checks", [])
    if not isinstance(checks, list) or not all(isinstance(c, str) and c.startswith(CHECK_PREFIXES) for c in checks):
        raise ExpectedError(f"{where}: 'checks' must be a list of check names, e.g. [\"serving.vllm\"]")
    if status in NEEDS_MATCH and not patterns:
        raise ExpectedError(
            f"{where}: an expected {status!r} needs a match (the problems it expects); none accepts any"
        )
    tensors = tuple(t for _, t in patterns) if any(t for _, t in patterns) else ()
    return Expectation(
        tuple(cells), status, reason, tuple(when), tuple(m for m, _ in patterns), tuple(specs), tuple(checks), tensors
    )


def _regex(pattern: Any, what: str, where: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ExpectedError(f"{where}: {what} must be a regular expression (a non-empty string)")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ExpectedError(f"{where}: {what} {pattern!r} is not a regular expression: {exc}") from None
    return pattern


def _parse_pattern(raw: str | dict[str, Any], where: str) -> tuple[str, Tensors | None]:
    """A pattern of ``match``: a regular expression, or ``{problem, tensors, count}`` for a problem listing tensors."""
    if isinstance(raw, str):
        return _regex(raw, "match", where), None
    unknown = set(raw) - _PATTERN_KEYS
    if unknown or "tensors" not in raw:
        raise ExpectedError(
            f"{where}: a match table is {{ problem = 'regex', tensors = 'regex' or ['name', ...], count = N }} "
            f"(tensors required, count optional); got keys {sorted(raw)}"
        )
    names, count = raw["tensors"], raw.get("count")
    if isinstance(names, list):
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ExpectedError(f"{where}: tensors must be a regular expression or a non-empty list of tensor names")
        names = tuple(names)
    else:
        names = _regex(names, "tensors", where)
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ExpectedError(f"{where}: count must be a positive integer (how many tensors the problem lists)")
    return _regex(raw.get("problem"), "a match table's problem", where), Tensors(names, count)


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
