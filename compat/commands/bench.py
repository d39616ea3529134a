"""``python -m compat bench``: the same cells with cold, forked and warm ranks, side by side in one run.

- ``cold``: a fresh ``python -m compat.rank.worker`` process per rank per cell (imports everything);
- ``fork``: a fresh process per rank per cell, forked from the fork server (CPU only);
- ``warm``: rank groups kept from cell to cell (``compat.launch.pool``), after one pass that starts them.

Cells run one at a time, so the figures are the cells' own. Prints the machine, the versions, each
mode's cells as ``compat run`` does (``compat.report.terminal``: a row per cell, a summary with the
wall time), then each cell's wall time per mode and the speed-up, rank 0's peak host and GPU memory
(a warm rank's: since its group started); ``-v`` adds the per-step split of
the steps inside the ranks, ``-q`` prints only the summaries and the table. ``--output`` writes the
figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compat.report.terminal import RunView, add_verbosity, duration

__all__ = ["add_parser", "main"]

MODES = ("cold", "fork", "warm")


def add_parser(sub: Any, run_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    b = sub.add_parser("bench", help="time cells with cold, forked and warm ranks, side by side")
    run_arguments(b)
    b.add_argument("--modes", default=",".join(MODES), help=f"which of {', '.join(MODES)} (default: all)")
    b.add_argument("--output", type=Path, help="also write the figures as JSON")
    b.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also profile every rank's cell (cProfile: DIR/<cell>.<phase>.rank<R>.txt)",
    )
    add_verbosity(b)


def main(args: argparse.Namespace) -> int:
    from compat.launch.run_config import BadInput, configure

    try:
        config = configure(args)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or set(modes) - set(MODES):
            raise BadInput(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
        if "fork" in modes and config.backend != "cpu":
            modes.remove("fork")  # the fork server serves CPU ranks only
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.profile:  # the ranks inherit it (compat.rank.worker.profiled); profiling slows what it measures
        os.environ["COMPAT_PROFILE"] = str(args.profile.resolve())
    print(f"bench on {config.device} ({config.backend}); {config.versions_line()}")
    print(f"{len(config.cells)} cells, one at a time; modes: {', '.join(modes)}", flush=True)
    if "fork" in modes:  # started once per run, before any cell: not a cell's cost
        from compat.launch import forkserver

        start = time.monotonic()
        forkserver.start()
        print(f"fork server started in {time.monotonic() - start:.1f} s (once per run)", flush=True)
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in modes:
        figures[mode] = _run_mode(mode, config, args.verbosity)
        if args.output:  # after each mode: a run stopped later keeps the modes it finished
            data = {"device": config.device, "backend": config.backend, "versions": config.versions, "figures": figures}
            args.output.write_text(json.dumps(data, indent=1) + "\n")
    print(table(figures, [c.id for c in config.cells], steps=args.verbosity > 0))
    return 0


def _run_mode(mode: str, config: Any, verbosity: int) -> dict[str, dict[str, Any]]:
    from compat.launch.launcher import run_cell
    from compat.launch.pool import Pool

    ranks = Pool(mode)
    workdir = Path(tempfile.mkdtemp(prefix=f"compat-bench-{mode}-"))
    out: dict[str, dict[str, Any]] = {}

    def run(cell: Any) -> tuple[Any, float]:
        start = time.monotonic()
        r = run_cell(
            cell, config.backend, config.expected(cell), config.timeout, workdir, plugins=config.plugins, ranks=ranks
        )
        return r, time.monotonic() - start

    try:
        if mode == "warm":  # a first pass starts the groups: its time is no cell's
            start = time.monotonic()
            for cell in config.cells:
                run(cell)
            if verbosity >= 0:
                print(f"warm: rank groups started by a first pass in {duration(time.monotonic() - start)}", flush=True)
        results = []
        with RunView([c.id for c in config.cells], verbosity, title=mode) as view:
            for cell in config.cells:
                view.started(cell.id)
                r, wall = run(cell)
                steps = r.metrics.get("seconds_by_step", {})
                out[cell.id] = {"seconds": round(wall, 2), "status": r.status, "met": r.met, "steps": steps}
                out[cell.id]["peak_memory"] = r.metrics.get("peak_memory", {})
                results.append(r)
                view.finished(r)
            view.close(results)
    finally:
        ranks.shutdown()
    return out


def table(figures: dict[str, dict[str, dict[str, Any]]], ids: list[str], steps: bool = True) -> str:
    """Wall seconds per cell and mode, the speed-up of warm over cold, then (``steps``) each mode's
    per-step split."""
    modes = list(figures)
    lines = [
        "",
        "| cell | " + " | ".join(f"{m} (s)" for m in modes) + " | cold / warm |",
        "|" + " --- |" * (len(modes) + 2),
    ]
    for cid in ids:
        secs = [figures[m].get(cid, {}).get("seconds") for m in modes]
        cold, warm = figures.get("cold", {}).get(cid, {}), figures.get("warm", {}).get(cid, {})
        ratio = f"{cold['seconds'] / warm['seconds']:.1f}x" if cold and warm and warm["seconds"] else "-"
        lines.append(f"| {cid} | " + " | ".join("-" if s is None else f"{s:.2f}" for s in secs) + f" | {ratio} |")
    lines += ["", "Peak memory of rank 0 (GiB: host RSS / GPU allocated by torch; warm: since the group started):", ""]
    lines += [f"- {m} {cid}: {_memory(figures[m].get(cid, {}))}" for m in modes for cid in ids]
    for m in modes:
        total = [f["seconds"] for f in figures[m].values()]
        if total:
            lines.append(
                f"\n{m}: {len(total)} cells, {sum(total):.1f} s in all, median {statistics.median(total):.2f} s"
            )
    for m in modes if steps else ():
        names = sorted({s for f in figures[m].values() for s in f["steps"]}, key=_step_order(figures[m]))
        if not names:
            continue
        lines += ["", f"Steps inside the ranks, {m} (s, rank 0):", "", "| cell | " + " | ".join(names) + " |"]
        lines.append("|" + " --- |" * (len(names) + 1))
        for cid in ids:
            f = figures[m].get(cid, {}).get("steps", {})
            lines.append(f"| {cid} | " + " | ".join(f"{f[s]:.2f}" if s in f else "-" for s in names) + " |")
    return "\n".join(lines)


def _memory(figure: dict[str, Any]) -> str:
    peak = figure.get("peak_memory") or {}
    return f"host {peak.get('host_gib', '-')} / GPU {peak.get('gpu_gib', '-')}"


def _step_order(figures: dict[str, dict[str, Any]]) -> Callable[[str], int]:
    order: dict[str, int] = {}
    for f in figures.values():
        for s in f["steps"]:
            order.setdefault(s, len(order))
    return lambda s: order[s]
