"""``python -m compat``: run cells or a matrix, list families, render and compare results, gate, bench.

Exit 0 iff every cell met its expected outcome, 2 for bad input (nothing run, nothing written),
1 otherwise. Every refusal is one ``error:`` line saying what is wrong.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from compat.declare.cells import DEFAULT_SYNC, DTYPES, SYNCS, Cell
from compat.declare.plugins import ROLES
from compat.declare.specs import SPECS
from compat.launch import launcher as launch
from compat.launch.run_config import BadInput, RunConfig, configure
from compat.report.terminal import add_verbosity
from compat.report.vocabulary import UNMET, cells

__all__ = ["main"]

EXIT_OK, EXIT_UNMET, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compat", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one cell (--family/--layout) or a matrix (--matrix)")
    _run_arguments(run)
    run.add_argument(
        "--output", type=Path, default=Path("results.json"), help="results file to write (default: results.json)"
    )
    run.add_argument("--jobs", type=int, default=1, help="cells run at once (each launches world_size ranks)")
    run.add_argument(
        "--keep-dir",
        type=Path,
        help="where files of cells that miss their expected outcome are kept (default: a new temporary folder)",
    )
    add_verbosity(run)
    fam = sub.add_parser("families", help="architectures the installed bridge registers, and the family x layout grid")
    fam.add_argument("--families", type=Path, dest="families_file", help="your own family declarations (TOML)")
    add_verbosity(fam)
    rep = sub.add_parser("report", help="results.json as Markdown; --html/--heatmap write a page and a picture")
    rep.add_argument("results", type=Path, nargs="+", help="results.json files")
    rep.add_argument("--html", type=Path, help="write a self-contained HTML page (of the first file)")
    rep.add_argument("--heatmap", type=Path, help="write a family x layout heatmap PNG (of the first file)")
    rep.add_argument(
        "--side-by-side",
        action="store_true",
        help="one table: the first file's cells, with the same cells of the other files beside them",
    )
    rep.add_argument("--labels", help="comma-separated column names for --side-by-side (default: file names)")
    add_verbosity(rep)
    dif = sub.add_parser("diff", help="what changed between two results files (status, max diff)")
    dif.add_argument("before", type=Path)
    dif.add_argument("after", type=Path)
    add_verbosity(dif)
    from compat.commands import bench, fuzz, gate

    gate.add_parser(sub)
    bench.add_parser(sub, _run_arguments)
    fuzz.add_parser(sub)
    return p


def _run_arguments(run: argparse.ArgumentParser) -> None:
    """What selects and configures cells: shared by ``run`` and ``bench``."""
    run.add_argument("--matrix", type=Path, help="matrix TOML file (matrix/ci.toml)")
    run.add_argument("--family", help="one cell: the model family")
    run.add_argument("--layout", help="one cell: tp=2,ep=2 or as cell ids write it, tp2-ep2 (tp1: one process)")
    run.add_argument("--load-layout", help="one cell: load and export at this layout (default: --layout)")
    run.add_argument("--adapter", default="lora", help="one cell: adapter kind (default: lora)")
    # No argparse ``choices``: Cell.make refuses an unknown dtype or spec with the nearest name.
    run.add_argument("--dtype", default="fp32", help=f"one cell: dtype, {' or '.join(DTYPES)} (default: fp32)")
    run.add_argument("--spec", default="local", help=f"one cell: layer spec, {' or '.join(SPECS)} (default: local)")
    run.add_argument(
        "--serve", action="append", default=[], help="one cell: a serving engine that loads the export too (vllm)"
    )
    run.add_argument(
        "--sync",
        default=DEFAULT_SYNC,
        choices=SYNCS,
        help="one cell: the adapter as files (save_hf_adapter), or also in memory as verl's rollout sync takes it "
        "(default: file)",
    )
    run.add_argument("--expected", type=Path, help="expected outcomes (default: expected.toml beside the matrix)")
    run.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    run.add_argument("--timeout", type=float, help=f"seconds per cell launch (default {launch.DEFAULT_TIMEOUT:.0f})")
    run.add_argument("-k", dest="select", help="run only cells whose id contains this text (a|b: either)")
    run.add_argument("--shard", help="K/N: run the K-th of N interleaved slices of the cells (split long runs)")
    run.add_argument("--families", type=Path, dest="families_file", help="your own family declarations (TOML)")
    run.add_argument("--adapters", type=Path, dest="adapters_file", help="your own adapter declarations (TOML)")
    for role in ROLES:
        run.add_argument(f"--{role}", help=f"your {role}, 'package.module:function' (docs/reference/plugins.md)")


def _run(args: argparse.Namespace) -> int:
    try:
        config = configure(args)
        if args.jobs < 1:
            raise BadInput("--jobs must be at least 1")
        if not args.output.parent.is_dir():
            raise BadInput(f"cannot write {args.output}: {args.output.parent} is not a directory")
        if args.keep_dir and args.keep_dir.exists() and not args.keep_dir.is_dir():
            raise BadInput(f"--keep-dir {args.keep_dir} is a file, not a directory")
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from compat.launch.external import is_external_launch

    if is_external_launch():
        return _run_external(args, config)
    if args.keep_dir:
        args.keep_dir.mkdir(parents=True, exist_ok=True)  # a new folder is fine: it is where files will go
    workdir = Path(tempfile.mkdtemp(prefix="compat-run-", dir=args.keep_dir))
    print(f"{cells(len(config.cells))} on {config.device} ({config.backend}); {config.versions_line()}", flush=True)
    from compat.report.terminal import RunView
    from compat.results.record import CellResult, write_results

    results: dict[str, CellResult] = {}
    order = {c.id: i for i, c in enumerate(config.cells)}
    view = RunView([c.id for c in config.cells], args.verbosity, jobs=args.jobs)

    def one(cell: Cell) -> CellResult:
        view.started(cell.id)
        return launch.run_cell(
            cell, config.backend, config.expected(cell), config.timeout, workdir=workdir, plugins=config.plugins
        )

    executor = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        with view:
            pending = {executor.submit(one, c) for c in config.cells}
            while pending:
                # A timed wait: Ctrl-C may reach a worker thread, and only the main thread raises
                # KeyboardInterrupt, when it next runs; an untimed wait would hold it until a cell ends.
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    r = future.result()
                    results[r.id] = r
                    view.finished(r)
                if finished:
                    done = sorted(results.values(), key=lambda r: order[r.id])
                    write_results(
                        args.output, done, config.backend, config.device, config.versions, False, _selection(args)
                    )
            ordered = sorted(results.values(), key=lambda r: order[r.id])
            write_results(args.output, ordered, config.backend, config.device, config.versions, True, _selection(args))
            view.close(ordered)
    except KeyboardInterrupt:
        launch.STOP.set()
        executor.shutdown(wait=True, cancel_futures=True)
        print("interrupted: every rank was stopped", file=sys.stderr)
        return 130
    executor.shutdown()
    kept = [r for r in ordered if r.files]
    if kept:
        print(f"files of the {UNMET} {'cell' if len(kept) == 1 else 'cells'} are kept under {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"results written to {args.output}")
    return EXIT_OK if all(r.met for r in ordered) else EXIT_UNMET


def _selection(args: argparse.Namespace) -> dict[str, str]:
    """How the cells were chosen, recorded in results.json: a ``-k`` or ``--shard`` run is a part."""
    return {"matrix": str(args.matrix or ""), "k": args.select or "", "shard": args.shard or ""}


def _run_external(args: argparse.Namespace, config: RunConfig) -> int:
    """Under torchrun/Slurm: this process is one rank; rank 0 prints and writes the output."""
    from compat.launch.external import run_here
    from compat.report.terminal import RunView
    from compat.results.record import write_results

    view = RunView([c.id for c in config.cells], args.verbosity)
    results = run_here(config.cells, config.backend, config.expectations, config.timeout, config.plugins)
    if results is None:
        return EXIT_OK
    write_results(args.output, results, config.backend, config.device, config.versions, True, _selection(args))
    with view:
        for r in results:
            view.finished(r)
        view.close(results)
    return EXIT_OK if all(r.met for r in results) else EXIT_UNMET


def _families(args: argparse.Namespace) -> int:
    from compat.report.families_view import print_families

    try:
        if args.families_file:
            from compat.declare.families import add_families

            add_families(args.families_file)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print_families(sys.stdout, verbosity=args.verbosity)
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from compat.report.markdown import markdown
    from compat.results.record import read_results

    runs = [read_results(path) for path in args.results]
    if args.side_by_side:
        from compat.report.side_by_side import side_by_side

        labels = args.labels.split(",") if args.labels else [path.stem for path in args.results]
        if len(labels) != len(runs):
            print(f"error: --labels names {len(labels)} columns for {len(runs)} files", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(side_by_side(runs, labels))
    else:
        print(
            "\n".join(markdown(data, str(path), args.verbosity) for data, path in zip(runs, args.results, strict=True))
        )
    if args.heatmap:
        from compat.report.heatmap import heatmap

        heatmap(runs[0], args.heatmap)
        print(f"heatmap written to {args.heatmap}")
    if args.html:
        from compat.report.html import html_report

        args.html.write_text(html_report(runs[0], str(args.results[0]), args.heatmap))
        print(f"HTML report written to {args.html}")
    return EXIT_OK


def _diff(args: argparse.Namespace) -> int:
    from compat.report.diff import diff, diff_markdown
    from compat.results.record import read_results

    changes = diff(read_results(args.before), read_results(args.after))
    print(diff_markdown(changes, str(args.before), str(args.after), args.verbosity))
    return EXIT_UNMET if changes.outcome_changed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "report":
        return _report(args)
    if args.command == "diff":
        return _diff(args)
    if args.command == "gate":
        from compat.commands import gate

        return gate.main(args)
    if args.command == "bench":
        from compat.commands import bench

        return bench.main(args)
    if args.command == "fuzz":
        from compat.commands import fuzz

        return fuzz.main(args)
    return _families(args)
