"""``python -m compat fuzz``: Hypothesis searches model shapes and layouts, and shrinks a new failure.

Each drawn cell (``compat.declare.shapes``) runs through the normal launcher, on the warm rank groups, and
is printed as it finishes. A cell that meets its expectation (``matrix/expected.toml``: the drawn
shape's own entry, else the base family's at the same layout) is reported and the search goes on; a
failure no expectation covers is raised to Hypothesis, which shrinks it toward the declared shape,
``tp1`` and fp32, and the smallest one is printed as a ``compat run`` command and a families-file
snippet. The example database is kept in the repository (``matrix/fuzz-examples/``): a failure found once
is replayed first next time. Profiles, as Hypothesis names them: ``ci`` (fixed seed, fits ``make
test``) and ``nightly`` (longer).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compat.checks.upstream import HARNESS_ROOT

__all__ = ["DATABASE", "PROFILES", "Profile", "Search", "add_parser", "main", "register_profiles"]

# In the repository, outside .hypothesis/ (which Hypothesis git-ignores): found failures replay first next time.
DATABASE = HARNESS_ROOT / "matrix" / "fuzz-examples"
CORE = ("llama", "qwen2", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class Profile:
    """A named search size: examples at most, seconds at most (None: no limit), a fixed seed or none."""

    examples: int
    budget: float | None
    seed: int | None


PROFILES = {
    "ci": Profile(examples=6, budget=None, seed=24),  # examples, not seconds: the same cells on any machine
    "nightly": Profile(examples=2000, budget=1800.0, seed=None),
}


def register_profiles() -> None:
    """Register ``ci`` and ``nightly`` with Hypothesis (``--hypothesis-profile`` selects them in pytest)."""
    from hypothesis import HealthCheck, settings

    for name, profile in PROFILES.items():
        settings.register_profile(
            name,
            max_examples=profile.examples,
            deadline=None,  # a cell takes seconds, and its first run (cold ranks) the longest
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )


class NewFailure(AssertionError):
    """A drawn cell missed its expected outcome, with no expectation covering it."""

    def __init__(self, result: Any, drawn: Any) -> None:
        super().__init__(f"{result.id}: {result.status}: {result.reason}")
        self.result, self.drawn = result, drawn


_KINDS: dict[str, type[NewFailure]] = {}


def failure_kind(status: str, reason: str) -> type[NewFailure]:
    """One exception class per kind of failure (status and the reason's words, numbers and names left out):
    Hypothesis tells bugs apart by exception type, so two kinds are shrunk and reported separately."""
    first = re.sub(r"^\[\w+\] ", "", (reason.splitlines() or [""])[0])  # the phase ([save], [load]) aside
    words = re.sub(r"\S*[\d.'_/]\S*", "", first).split(":")[0].split()
    key = f"{status}: {' '.join(words[:12])}"
    with _KINDS_LOCK:
        if key not in _KINDS:
            _KINDS[key] = type(f"NewFailure{len(_KINDS)}", (NewFailure,), {"kind": key})
        return _KINDS[key]


_KINDS_LOCK = threading.Lock()


@dataclass
class Search:
    """One search's settings and what it saw; :meth:`run` drives Hypothesis."""

    families: tuple[str, ...]
    profile: str
    examples: int
    budget: float | None
    seed: int | None
    out: Path
    backend: str = "cpu"
    adapters: tuple[str, ...] = ("lora", "canonical", "r5", "attn")
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    spec: str = "local"
    max_world: int = 2
    timeout: float = 300.0
    database: Path | None = DATABASE
    printer: Any = print
    tried: list[dict[str, Any]] = field(default_factory=list)
    found: NewFailure | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> list[NewFailure]:
        """Search until the examples or the budget are spent, or a new failure is shrunk (returned)."""
        from hypothesis import given, seed, settings
        from hypothesis.database import DirectoryBasedExampleDatabase

        from compat.declare import shapes
        from compat.declare.expected import load_expectations
        from compat.declare.versions import installed_versions

        spaces, order = shapes.load_spaces()
        unknown = sorted(set(self.families) - set(spaces))
        if unknown:
            raise ValueError(f"no shapes declared for {', '.join(unknown)}; declared: {', '.join(sorted(spaces))}")
        drawn_families = shapes.DrawnFamilies(self.out / "families.toml")
        strategy = shapes.cells(
            {f: spaces[f] for f in self.families},
            order,
            drawn_families,
            self.adapters,
            self.dtypes,
            self.spec,
            self.max_world,
        )
        expectations = load_expectations(HARNESS_ROOT / "matrix" / "expected.toml")
        versions = installed_versions()
        started = time.monotonic()

        def cell_runs(drawn: shapes.Drawn) -> None:
            from hypothesis import reject

            over = self.budget is not None and time.monotonic() - started > self.budget
            if self.found is None and (over or self._stop.is_set()):
                reject()  # spent: the remaining examples are skipped, never run
            self._one(drawn, expectations, versions)

        register_profiles()
        test = settings(
            settings.get_profile(self.profile),
            max_examples=self.examples,
            database=DirectoryBasedExampleDatabase(self.database) if self.database else None,
        )(given(strategy)(cell_runs))
        if self.seed is not None:
            test = seed(self.seed)(test)
        try:
            test()
        except NewFailure as exc:
            return [exc]
        except BaseExceptionGroup as group:  # several kinds of failure, each shrunk
            found, rest = group.split(NewFailure)
            if rest is not None:
                raise
            return [e for e in found.exceptions if isinstance(e, NewFailure)] if found else []
        return []

    def _one(self, drawn: Any, expectations: Any, versions: dict[str, str | None]) -> None:
        from compat.checks.problems import Problem
        from compat.declare.expected import Expected
        from compat.launch.launcher import run_cell
        from compat.report.terminal import row

        cell = drawn.cell
        # Every entry naming the drawn cell, then every one naming its base cell: a drawn cell may show any
        # of several located bugs (canonical resharding and the EP export, say), whichever comes first.
        known = [
            e.expected()
            for cell_id in (cell.id, drawn.base_id)
            for e in expectations.entries
            if e.matches(cell_id, versions, cell.spec)
        ]
        result = run_cell(cell, self.backend, known[0] if known else Expected(), self.timeout, workdir=self.out)
        problems = [Problem.from_dict(p) for p in result.problems]
        new = result.status != "pass" and not any(e.met_by(result.status, problems) for e in known)
        shrinking = self.found is not None
        verdict = "NEW FAILURE" if new else ("expected" if result.status != "pass" else "ok")
        self.printer(
            f"[{len(self.tried) + 1}{' shrink' if shrinking else ''}] {verdict}: {row(result, len(result.id), {})}"
        )
        self.tried.append(
            {
                "id": result.id,
                "base": drawn.base,
                "overrides": drawn.overrides,
                "status": result.status,
                "met": result.met,
                "new": new,
                "shrinking": shrinking,
                "seconds": result.seconds,
                "max_abs_diff": result.max_abs_diff,
                "reason": result.reason.splitlines()[0] if result.reason else "",
            }
        )
        if new:
            failure = failure_kind(result.status, result.reason)(result, drawn)
            self.found = failure
            raise failure

    def stop(self) -> None:
        self._stop.set()


def reproduce(failure: NewFailure, out: Path) -> str:
    """The smallest failure as a families-file snippet and a ready-to-run ``compat run`` command."""
    from compat.declare import shapes
    from compat.declare.families import get_family

    drawn, cell = failure.drawn, failure.drawn.cell
    path = out / "minimal.toml"
    if drawn.overrides:
        path.write_text(shapes.family_snippet(get_family(drawn.base), cell.family, drawn.overrides))
    args = ["python -m compat run"]
    if drawn.overrides:
        args.append(f"--families {path}")
    args += [f"--family {cell.family}", f"--layout {_cli(cell.layout)}"]
    if cell.reshards:
        args.append(f"--load-layout {_cli(cell.load_layout)}")
    args += [f"--adapter {cell.adapter}", f"--dtype {cell.dtype}", f"--spec {cell.spec}", "--output results.json"]
    snippet = path.read_text() if drawn.overrides else f"(the declared family {drawn.base}, unchanged)\n"
    return f"{' '.join(args)}\n\n{snippet}"


def _cli(layout: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in layout.as_dict().items() if v != 1) or "tp=1"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fuzz", help="search model shapes and layouts (Hypothesis); shrink a new failure")
    p.add_argument("--family", action="append", dest="families", help=f"a family to search (default: {CORE})")
    p.add_argument("--profile", choices=sorted(PROFILES), help="a named search size (default: ci)")
    p.add_argument("--budget", type=float, help="seconds of searching at most (a shrink may run past it)")
    p.add_argument("--examples", type=int, help="cells drawn at most")
    p.add_argument("--seed", type=int, help="a fixed seed (default: the profile's)")
    p.add_argument("--jobs", type=int, default=1, help="searches at once, seeds S..S+N-1 (each a rank group)")
    p.add_argument("--dtype", action="append", dest="dtypes", help="dtypes drawn (default: fp32 and bf16)")
    p.add_argument("--max-world", type=int, default=2, help="largest world size drawn (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per cell launch (default 300)")
    p.add_argument("--out", type=Path, help="where drawn families, the log and the minimal failure go")
    p.add_argument("--no-database", action="store_true", help="neither replay nor save examples")


def main(args: argparse.Namespace) -> int:
    """Exit 0 when no new failure was found, 1 when one was (printed shrunk), 2 for bad input."""
    import tempfile

    from compat.declare.cells import DTYPES
    from compat.launch.run_config import BadInput

    name = args.profile or "ci"
    profile = PROFILES[name]
    try:
        families = tuple(args.families or CORE)
        dtypes = tuple(args.dtypes or DTYPES)
        if not set(dtypes) <= set(DTYPES):
            raise BadInput(f"--dtype {sorted(set(dtypes) - set(DTYPES))}: known dtypes are {', '.join(DTYPES)}")
        for option, value in (("--jobs", args.jobs), ("--max-world", args.max_world), ("--examples", args.examples)):
            if value is not None and value < 1:
                raise BadInput(f"{option} must be at least 1")
        out = args.out or Path(tempfile.mkdtemp(prefix="compat-fuzz-"))
        out.mkdir(parents=True, exist_ok=True)
        from compat.declare import shapes

        spaces, _ = shapes.load_spaces()
        unknown = sorted(set(families) - set(spaces))
        if unknown:
            raise BadInput(f"no shapes declared for {', '.join(unknown)} (compat/data/shapes.toml): {sorted(spaces)}")
    except (BadInput, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else profile.seed
    searches = [
        Search(
            families=families,
            profile=name,
            examples=args.examples or profile.examples,
            budget=args.budget if args.budget is not None else profile.budget,
            seed=None if seed is None else seed + i,
            out=out / f"search{i}",
            dtypes=dtypes,
            max_world=args.max_world,
            timeout=args.timeout,
            database=None if args.no_database else DATABASE,
            printer=lambda line: print(line, flush=True),
        )
        for i in range(args.jobs)
    ]
    print(f"fuzz: {', '.join(families)}; {len(searches)} search(es), seed {seed}, out {out}", flush=True)
    start = time.monotonic()
    failures = _run_all(searches)
    wall = time.monotonic() - start
    tried = [t for s in searches for t in s.tried]
    with (out / "log.jsonl").open("w") as log:
        for t in tried:
            log.write(json.dumps(t) + "\n")
    from compat.launch.pool import pool

    pool().shutdown()
    print(_summary(tried, wall), flush=True)
    for failure in failures:
        print(f"\nNEW FAILURE, shrunk to its smallest cell: {failure.result.id}\n{failure.result.reason}\n")
        print(reproduce(failure, out))
    return 1 if failures else 0


def _run_all(searches: list[Search]) -> list[NewFailure]:
    """Run the searches (threads when more than one); the first new failure stops the others' drawing."""
    failures: list[NewFailure] = []

    def one(search: Search) -> None:
        found = search.run()
        if found:
            failures.extend(found)
            for other in searches:
                other.stop()

    if len(searches) == 1:
        one(searches[0])
        return failures
    threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in searches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def _summary(tried: list[dict[str, Any]], wall: float) -> str:
    shapes = {(t["base"], json.dumps(t["overrides"], sort_keys=True)) for t in tried}
    return (
        f"\nfuzz: {len(tried)} cells tried ({sum(not t['shrinking'] for t in tried)} drawn, "
        f"{sum(t['shrinking'] for t in tried)} while shrinking), {len(shapes)} distinct shapes, "
        f"{sum(t['new'] for t in tried)} new failures, "
        f"{sum(t['status'] != 'pass' and t['met'] for t in tried)} expected failures; "
        f"wall {wall:.0f}s (CPU: the ranks are the fork server's children, reaped at exit: /usr/bin/time counts them)"
    )
