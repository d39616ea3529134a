"""``python -m compat``: run cells or a matrix, list families. Exit 0 iff every cell met its
expected outcome, 2 for bad input (nothing run, nothing written), 1 otherwise."""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from compat import launch
from compat.cells import DTYPES, Cell
from compat.expected import Expectations, load_expectations
from compat.external import is_external_launch
from compat.families import families
from compat.layouts import Layout
from compat.matrix import Matrix, load_matrix
from compat.report import CellResult, device_name, format_header, format_row, print_table, write_results
from compat.versions import check_stack, installed_versions

__all__ = ["BadInput", "main"]

EXIT_OK, EXIT_UNMET, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Refused before any process starts."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compat", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one cell (--family/--layout) or a matrix (--matrix)")
    run.add_argument("--matrix", type=Path, help="matrix TOML file (matrix/ci.toml)")
    run.add_argument("--family", help="one cell: the model family")
    run.add_argument("--layout", help="one cell: e.g. tp=2,pp=2")
    run.add_argument("--load-layout", help="one cell: load and export at this layout (default: --layout)")
    run.add_argument("--adapter", default="lora", help="one cell: adapter kind (default: lora)")
    run.add_argument("--dtype", default="fp32", choices=DTYPES, help="one cell: dtype (default: fp32)")
    run.add_argument("--output", type=Path, required=True, help="results.json to write")
    run.add_argument("--expected", type=Path, help="expected outcomes (default: matrix/expected.toml)")
    run.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--timeout", type=float, help=f"seconds per cell launch (default {launch.DEFAULT_TIMEOUT:.0f})")
    run.add_argument("--jobs", type=int, default=1, help="cells run at once (each launches world_size ranks)")
    run.add_argument("-k", dest="select", help="run only cells whose id contains this text")
    run.add_argument("--shard", help="K/N: run the K-th of N interleaved slices of the cells (split long runs)")
    sub.add_parser("families", help="architectures the installed bridge registers, and what the harness builds")
    rep = sub.add_parser("report", help="a results.json as Markdown (job summaries, docs)")
    rep.add_argument("results", type=Path, nargs="+", help="results.json files")
    from compat import gate

    gate.add_parser(sub)
    return p


def _cells(args: argparse.Namespace) -> tuple[list[Cell], float | None]:
    if args.matrix and (args.family or args.layout):
        raise BadInput("give either --matrix or --family/--layout, not both")
    if args.matrix:
        matrix: Matrix = load_matrix(args.matrix)
        cells, timeout = list(matrix.cells), matrix.timeout
    elif args.family and args.layout:
        load = Layout.parse(args.load_layout) if args.load_layout else None
        cells, timeout = [Cell.make(args.family, Layout.parse(args.layout), load, args.adapter, args.dtype)], None
    else:
        raise BadInput("give --matrix FILE, or --family F --layout L for one cell")
    if args.select:
        cells = [c for c in cells if args.select in c.id]
        if not cells:
            raise BadInput(f"-k {args.select!r} selects no cell")
    if args.shard:
        k, sep, n = args.shard.partition("/")
        if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
            raise BadInput(f"--shard {args.shard!r}: expected K/N with 1 <= K <= N, e.g. 1/2")
        cells = cells[int(k) - 1 :: int(n)]
    return cells, timeout


def _expectations(args: argparse.Namespace) -> Expectations:
    if args.expected is not None:
        if not args.expected.is_file():
            raise BadInput(f"expected-outcomes file {args.expected} does not exist")
        return load_expectations(args.expected)
    default = (args.matrix.parent if args.matrix else Path("matrix")) / "expected.toml"
    return load_expectations(default if default.is_file() else None)


def _run(args: argparse.Namespace) -> int:
    try:
        cells, matrix_timeout = _cells(args)
        expectations = _expectations(args)
        check_stack()
        if args.jobs < 1:
            raise BadInput("--jobs must be at least 1")
        if not args.output.parent.is_dir():
            raise BadInput(f"cannot write {args.output}: {args.output.parent} is not a directory")
    except (BadInput, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from compat.backends import detect

    backend = detect() if args.backend == "auto" else args.backend
    timeout = args.timeout or matrix_timeout or launch.DEFAULT_TIMEOUT
    versions = installed_versions()
    device = device_name(backend)
    if is_external_launch():
        return _run_external(args, cells, expectations, backend, device, timeout)
    print(f"{len(cells)} cells on {device} ({backend}); " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(format_header(), flush=True)
    results: dict[str, CellResult] = {}
    order = {c.id: i for i, c in enumerate(cells)}

    def one(cell: Cell) -> CellResult:
        return launch.run_cell(cell, backend, expectations.status_for(cell.id, versions), timeout)

    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        pending = {pool.submit(one, c) for c in cells}
        while pending:
            # A timed wait: Ctrl-C may reach a worker thread, and only the main thread raises
            # KeyboardInterrupt, when it next runs; an untimed wait would hold it until a cell ends.
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                r = future.result()
                results[r.id] = r
                print(format_row(r), flush=True)
            if finished:
                done = sorted(results.values(), key=lambda r: order[r.id])
                write_results(args.output, done, backend, device, versions)
    except KeyboardInterrupt:
        launch.STOP.set()
        pool.shutdown(wait=True, cancel_futures=True)
        print("interrupted: every rank was stopped", file=sys.stderr)
        return 130
    pool.shutdown()
    ordered = sorted(results.values(), key=lambda r: order[r.id])
    print()
    print_table(ordered, sys.stdout)
    return EXIT_OK if all(r.met for r in ordered) else EXIT_UNMET


def _run_external(
    args: argparse.Namespace, cells: list[Cell], expectations: Expectations, backend: str, device: str, timeout: float
) -> int:
    """Under torchrun/Slurm: this process is one rank; rank 0 prints and writes the output."""
    from compat.external import run_here

    results = run_here(cells, backend, expectations, timeout)
    if results is None:
        return EXIT_OK
    write_results(args.output, results, backend, device, installed_versions())
    print_table(results, sys.stdout)
    return EXIT_OK if all(r.met for r in results) else EXIT_UNMET


def _families() -> int:
    from compat.registry import registered_architectures
    from compat.status import last_known

    archs = registered_architectures()
    declared: dict[str, list[Any]] = {}
    for fam in families().values():  # an architecture may have several families (llama, llama_tied)
        declared.setdefault(fam.architecture, []).append(fam)
    known = last_known()
    print(f"{'architecture':34} {'harness family':20} status")
    for arch in sorted(set(archs) | set(declared)):
        if arch not in declared:
            print(f"{arch:34} {'-':20} not built by the harness")
            continue
        note = "" if arch in archs else "  (not registered by the installed bridge: unsupported)"
        for fam in declared[arch]:
            print(f"{arch:34} {fam.name:20} {known.get(fam.name, 'no results yet')}{note}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "report":
        from compat.report import markdown, read_results

        print("\n".join(markdown(read_results(path), str(path)) for path in args.results))
        return EXIT_OK
    if args.command == "gate":
        from compat import gate

        return gate.main(args)
    return _families()
