"""``python -m compat gate``: run the CI matrix (or another) on a pinned set of releases, in an isolated
environment, and compare with the expected outcomes and with the last accepted results.

A pin set is data, ``matrix/pins/NAME.toml``:

```toml
about = "megatron-bridge 0.5.1 with the megatron-core and transformers of its release"
[packages]                    # exact versions; torch is never pinned here (shared)
megatron-bridge = "0.5.1"
megatron-core = "0.18.2"
transformers = "5.8.1"
peft = "0.19.1"
tokenizers = "0.22.2"         # and whatever else the release needs (pulp, ...)
```

The environment lives in ``.gate/NAME/venv`` and is reused while the pins file is unchanged
(keyed by a hash of its bytes and of the interpreter). It sees the calling environment's packages
at lower priority (a ``.pth`` file naming this interpreter's site-packages), and only the pinned
packages are installed into it, ``--no-deps``, so they shadow the shared ones (torch is never
installed per set). The caller's own ``PYTHONPATH`` folders (the GPU image's carried ``/tmp/site``
with Transformer Engine) are named in that ``.pth`` too, below the pins: on ``PYTHONPATH`` they would
shadow them. The harness is made importable through ``PYTHONPATH`` (the repo root alone); every other
variable of the caller's environment is passed on (``PIP_NO_INDEX``/``PIP_FIND_LINKS``: an offline
build from carried wheels).

Then ``<gate python> -m compat run --matrix ... --output .gate/NAME/results.json`` runs there
(workers start with ``sys.executable``, so they use the gate interpreter too).

Exit 0: everything vouched for. 1: what the gate cannot vouch for: a cell unmet (its status or its
problems are not the expected ones), and, unless ``--accept`` records them, a regression (a cell
expected to pass, or that passed in the accepted results ``matrix/pins/accepted/NAME.json``, does
not pass now), another status change, other problems (or tensors) than accepted, checks skipped
otherwise, other oracle coverage, another kind of device, or an accepted cell that did not run
(one ``-k`` selects: those it leaves out are counted). 2: bad input, or the environment could not be
built (the message says why).

``--accept`` writes the accepted results (``compat.results.baseline``) only from a complete run of the
whole matrix they were accepted from, on the same kind of device, holding every accepted cell: a
cell leaves them only by ``--forget ID --why TEXT``, which the file keeps. Anything else is refused
(exit 2) and the file is left as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compat.checks.upstream import HARNESS_ROOT
from compat.commands.gate_compare import check_complete, compare, failing, markdown, terminal
from compat.declare.pin_sets import GateError, build_env, read_pins_file, shared_paths
from compat.report.terminal import add_verbosity, duration
from compat.results.baseline import FORMAT, baseline_cell, device_kind, read_baseline

__all__ = [
    "GateError",
    "PinSet",
    "add_parser",
    "build_env",
    "check_complete",
    "compare",
    "failing",
    "load_pins",
    "main",
]

EXIT_OK, EXIT_REGRESSION, EXIT_BAD = 0, 1, 2
REPO = HARNESS_ROOT
REQUIRED = ("megatron-bridge", "megatron-core", "transformers", "peft")
SHARED = ("torch",)  # never installed per set


@dataclass(frozen=True)
class PinSet:
    name: str
    path: Path
    packages: dict[str, str]
    about: str
    digest: str


def load_pins(path: Path) -> PinSet:
    from packaging.version import InvalidVersion, Version

    raw, data = read_pins_file(path, "pins file")
    unknown = set(data) - {"about", "packages"}
    if unknown:
        raise GateError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: about, [packages]")
    packages = data.get("packages")
    if not isinstance(packages, dict) or not packages:
        raise GateError(f'{path}: needs a [packages] table of name = "exact version"')
    missing = [p for p in REQUIRED if p not in packages]
    if missing:
        raise GateError(f"{path}: [packages] must pin {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    for name, version in packages.items():
        if name in SHARED:
            raise GateError(f"{path}: {name} is shared with the calling environment and is not pinned per set")
        if not isinstance(version, str):
            raise GateError(f"{path}: {name} = {version!r}: give the exact version as a string")
        try:
            Version(version)
        except InvalidVersion:
            raise GateError(f'{path}: {name} = {version!r} is not an exact version (e.g. "0.5.1")') from None
    key = hashlib.sha256(raw + sys.version.encode() + "\n".join(shared_paths()).encode()).hexdigest()[:16]
    return PinSet(path.stem, path, dict(packages), str(data.get("about", "")), key)


def ensure_env(pins: PinSet, root: Path) -> tuple[Path, bool, float]:
    """(gate python, whether it was reused, seconds spent); raises GateError when it can't be built."""
    reqs = [f"{name}=={version}" for name, version in pins.packages.items()]
    steps = [["--no-deps", "--ignore-installed", *reqs]]
    return build_env(pins.name, pins.digest, root / pins.name / "venv", steps, pins.packages, shared=shared_paths())


def add_parser(sub: Any) -> None:
    g = sub.add_parser("gate", help="run a matrix on a pinned release set in its own environment and compare")
    g.add_argument("--pins", type=Path, required=True, help="pin set, matrix/pins/NAME.toml")
    g.add_argument("--matrix", type=Path, default=REPO / "matrix" / "ci.toml", help="default: matrix/ci.toml")
    g.add_argument("--expected", type=Path, help="expected outcomes (default: matrix/expected.toml)")
    g.add_argument("--summary", type=Path, help="also write the comparison as Markdown (CI job summaries)")
    g.add_argument("--accept", action="store_true", help="record these results as accepted for the set")
    g.add_argument(
        "--accepted-dir",
        type=Path,
        default=REPO / "matrix" / "pins" / "accepted",
        help="accepted results, NAME.json (default: matrix/pins/accepted, the CPU ones; on a GPU name the "
        "device, e.g. matrix/pins/accepted/nvidia-h200x1-te)",
    )
    g.add_argument("--gate-dir", type=Path, default=REPO / ".gate", help="where environments live (.gate/)")
    g.add_argument("--timeout", type=float, help="seconds per cell launch (passed to compat run)")
    g.add_argument("--jobs", type=int, help="cells run at once (passed to compat run)")
    g.add_argument(
        "-k", dest="select", help="run only cells whose id contains this text (passed to compat run; not with --accept)"
    )
    g.add_argument(
        "--forget",
        action="append",
        default=[],
        metavar="ID",
        help="with --accept: take this accepted cell out of the accepted results (repeatable; needs --why)",
    )
    g.add_argument("--why", help="why the --forget cells leave the accepted results (kept in the file)")
    add_verbosity(g)  # passed to compat run too


def main(args: argparse.Namespace) -> int:
    try:
        return _gate(args)
    except GateError as exc:
        print(f"gate: error: {exc}", file=sys.stderr)
        return EXIT_BAD


def _gate(args: argparse.Namespace) -> int:
    pins = load_pins(args.pins)
    if args.select and args.accept:
        raise GateError("--accept with -k would shrink the accepted results to the selected cells: accept a full run")
    if args.forget and not (args.accept and args.why):
        raise GateError("--forget takes a cell out of the accepted results: give it with --accept and --why TEXT")
    if not args.matrix.is_file():
        raise GateError(f"matrix {args.matrix} does not exist")
    expected = args.expected or REPO / "matrix" / "expected.toml"
    if not expected.is_file():
        raise GateError(f"expected-outcomes file {expected} does not exist")
    accepted_path = (args.accepted_dir / f"{pins.name}.json").resolve()
    accepted = read_baseline(accepted_path)
    if args.accept and accepted is not None:
        _check_matrix(accepted, _shown(args.matrix), accepted_path)

    start = time.monotonic()
    python, reused, build_s = ensure_env(pins, args.gate_dir)
    shown = python.relative_to(REPO) if python.is_relative_to(REPO) else python
    print(f"gate: environment {'reused' if reused else 'built'} in {build_s:.1f} s: {shown}", flush=True)

    out = (args.gate_dir / pins.name / "results.json").resolve()
    out.unlink(missing_ok=True)
    env = dict(os.environ)  # the caller's environment goes through; its PYTHONPATH is in the .pth, below the pins
    env["PYTHONPATH"] = str(REPO)
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    env["PATH"] = os.pathsep.join((str(python.parent), env.get("PATH", "")))
    cmd = [str(python), "-m", "compat", "run", "--matrix", str(args.matrix.resolve())]
    cmd += ["--expected", str(expected.resolve())]
    cmd += ["--output", str(out)] + (["--timeout", str(args.timeout)] if args.timeout else [])
    cmd += ["-k", args.select] if args.select else []
    cmd += ["--jobs", str(args.jobs)] if args.jobs else []
    cmd += {-1: ["-q"], 1: ["-v"]}.get(args.verbosity, [])
    run_start = time.monotonic()
    rc = subprocess.run(cmd, env=env, cwd=REPO).returncode
    run_s = time.monotonic() - run_start
    if rc == EXIT_BAD or not out.is_file():
        raise GateError(f"`compat run` in the gate environment exited {rc} without results ({' '.join(cmd)})")
    results = json.loads(out.read_text())
    check_complete(results, f"`compat run` exited {rc}; {out}")
    want = {n: v for n, v in pins.packages.items() if n in results.get("versions", {})}
    off = {n: results["versions"][n] for n, v in want.items() if results["versions"][n] != v}
    if off:
        raise GateError(f"the run saw other versions than pinned: {off} (pins {want})")

    diff = compare(results, accepted, frozenset(args.forget), args.select)
    fails = failing(diff, args.accept)
    if args.accept:  # before anything is printed as accepted: a refused run leaves the file as it was
        _check_acceptable(results, accepted, set(args.forget), accepted_path)
    timing = (
        f"environment {'reused' if reused else 'built'} in {duration(build_s)}, matrix ran in {duration(run_s)} "
        f"({args.matrix.name}); {duration(time.monotonic() - start)} in all"
    )
    print()
    for line in terminal(pins.name, results, diff, fails, timing, args.verbosity):
        print(line)
    if args.summary:
        args.summary.write_text(markdown(pins.name, results, accepted, diff, timing, fails))
    if args.accept:
        accepted_path.parent.mkdir(parents=True, exist_ok=True)
        cells = [baseline_cell(c) for c in results.get("cells", [])]
        before = {c["id"]: c["status"] for c in (accepted or {}).get("cells", [])}
        forgotten = {
            **(accepted or {}).get("forgotten", {}),
            **{i: {"why": args.why, "was": before[i]} for i in args.forget},
        }
        record = {
            "format": FORMAT,
            "pins": pins.packages,
            "versions": results.get("versions"),
            "device": results.get("device"),
            "matrix": _shown(args.matrix),
            "forgotten": {i: f for i, f in forgotten.items() if i not in {c["id"] for c in cells}},
            "cells": cells,
        }
        accepted_path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"gate: accepted results written to {accepted_path}")
    return EXIT_REGRESSION if fails else EXIT_OK


def _shown(path: Path) -> str:
    """A matrix as an accepted file names it: relative to the checkout when inside it."""
    path = path.resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def _check_matrix(accepted: dict[str, Any], matrix: str, path: Path) -> None:
    """``--accept`` from another matrix than the accepted results' is refused before anything runs."""
    if accepted.get("matrix") not in (None, matrix):
        raise GateError(
            f"{path} was accepted from {accepted['matrix']}; --accept with {matrix} would replace it with another "
            f"set of cells: accept a run of {accepted['matrix']} (a cell leaves it only by --forget ID --why TEXT)"
        )


def _check_acceptable(results: dict[str, Any], accepted: dict[str, Any] | None, forget: set[str], path: Path) -> None:
    """A run the accepted results may be replaced with: the whole matrix, not narrowed, every cell met, on the
    same kind of device, holding every accepted cell that is not being forgotten. GateError otherwise."""
    selection = results.get("selection") or {}
    narrowed = {k: selection[k] for k in ("k", "shard") if selection.get(k)}
    if narrowed:
        raise GateError(f"the run was narrowed ({narrowed}): --accept takes a run of the whole matrix")
    unmet = sorted(c["id"] for c in results.get("cells", []) if not c.get("met", True))
    if unmet:  # a baseline holds outcomes someone vouched for: an unmet cell's expectation is to be fixed first
        shown = ", ".join(unmet[:10]) + (f" (+{len(unmet) - 10} more)" if len(unmet) > 10 else "")
        raise GateError(
            f"{len(unmet)} cells missed their expected outcome ({shown}): give each its expectation in "
            "matrix/expected.toml (the cause's text, the upstream line), then accept"
        )
    if accepted is None:
        return
    then, now = device_kind(accepted.get("device")), device_kind(results.get("device"))
    if then != now:
        raise GateError(
            f"{path} was accepted on {then}, this run is on {now}: accept on the same kind of device, or name "
            "another --accepted-dir for this one"
        )
    before, ran = {c["id"] for c in accepted.get("cells", [])}, {c["id"] for c in results.get("cells", [])}
    unknown, kept = sorted(forget - before), sorted(forget & ran)
    if unknown or kept:
        raise GateError(f"--forget names cells not in the accepted results {unknown} or that ran {kept}")
    lost = sorted(before - ran - forget)
    if lost:
        shown = ", ".join(lost[:10]) + (f" (+{len(lost) - 10} more)" if len(lost) > 10 else "")
        raise GateError(
            f"the run lacks {len(lost)} accepted cells: {shown}; accepting it would shrink the accepted results "
            f"({path}): run the whole matrix, or take a cell out by --forget ID --why TEXT"
        )
