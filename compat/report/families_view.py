"""``compat families``: what the installed bridge registers, what the harness declares, and how it went.

The last known status comes from the committed results (``matrix/results/`` beside the package,
wherever the command runs from; newest wins) as a
compact family x layout grid; a family with no results says what ``matrix/expected.toml`` expects.
Like ``compat run``, it ends with a summary (counts, wall time, one line per unmet cell of the newest
results); ``-q`` prints only that, ``-v`` the expectations' whole reasons.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from compat.checks.upstream import HARNESS_ROOT
from compat.declare.expected import load_expectations
from compat.declare.families import Family, families
from compat.declare.versions import installed_versions
from compat.report.terminal import duration
from compat.report.vocabulary import UNMET, grid_report, headline, unmet_line
from compat.results.record import expected_patterns

__all__ = ["RESULTS_DIR", "print_families"]

RESULTS_DIR = HARNESS_ROOT / "matrix" / "results"
EXPECTED = HARNESS_ROOT / "matrix" / "expected.toml"


def print_families(out: IO[str], results_dir: Path = RESULTS_DIR, verbosity: int = 0) -> None:
    from compat.rank.bridge_registry import registered_architectures

    start = time.monotonic()
    registered = set(registered_architectures())
    declared: dict[str, list[Family]] = {}
    for fam in families().values():  # an architecture may have several families (llama, llama_tied)
        declared.setdefault(fam.architecture, []).append(fam)
    runs = [_stack_cells(json.loads(p.read_text())) for p in sorted(results_dir.glob("*.json"))]
    untested = sorted(set(families()) - {c["family"] for run in runs for c in run.get("cells", [])})
    where = f"newest of {len(runs)} files in {_shown(results_dir)}"
    if verbosity >= 0:
        print(f"{'architecture':34} {'harness families':40} registered by the installed bridge", file=out)
        for arch in sorted(registered | set(declared)):
            names = ", ".join(f.name for f in declared.get(arch, [])) or "- (not built by the harness)"
            print(f"{arch:34} {names:40} {'yes' if arch in registered else 'no'}", file=out)
        print(file=out)
        for spec in sorted({c.get("spec", "local") for run in runs for c in run.get("cells", [])}):
            print(f"Last known status (lora, fp32, {spec} spec; {where}):", file=out)
            print(grid_report(runs, adapters=("lora", "lora_mla"), spec=spec), file=out)
        for name, text in _expected(untested, whole=verbosity > 0).items():
            print(f"{name}: no results yet; {text}", file=out)
        print(file=out)
    newest = {c["id"]: c for run in sorted(runs, key=lambda r: str(r.get("finished_at") or "")) for c in run["cells"]}
    unmet = [c for c in newest.values() if not c.get("met", False)]
    print(
        f"{len(registered)} architectures registered, {len(families())} families declared "
        f"({len(families()) - len(untested)} with results, {len(untested)} without); {len(newest)} cells "
        f"({where}): {len(newest) - len(unmet)} met, {len(unmet)} {UNMET}; in {duration(time.monotonic() - start)}",
        file=out,
    )
    for c in unmet:
        print(unmet_line(c["id"], c["expected"], expected_patterns(c), c["status"], c.get("reason", "")), file=out)


def _stack_cells(run: dict[str, Any]) -> dict[str, Any]:
    """The run without its planted-fault cells (``fault`` set: scripts/faults-at-width, the catalogue at
    width): they record what the harness catches, not the state of the stack, so never a last status."""
    return {**run, "cells": [c for c in run.get("cells", []) if not c.get("fault")]}


def _shown(path: Path) -> str:
    """``matrix/results`` for the package's own folder, the path as given for another."""
    return path.relative_to(HARNESS_ROOT).as_posix() if path.is_relative_to(HARNESS_ROOT) else str(path)


def _expected(names: list[str], whole: bool = False) -> dict[str, str]:
    """What expected.toml says of families with no results (their first entry on these versions):
    the reason's first line, or ``whole``."""
    expectations = load_expectations(EXPECTED)
    versions = installed_versions()
    out: dict[str, Any] = {}
    for name in names:
        entry = next((e for e in expectations.entries if e.matches(f"{name}.tp1", versions)), None)
        out[name] = (
            f"expected {entry.status}: {entry.reason.strip() if whole else headline(entry.reason)}"
            if entry
            else "expected to pass"
        )
    return out
