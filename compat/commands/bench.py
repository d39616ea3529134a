"""``python -m compat bench``: the same cells with cold, forked and warm ranks, side by side in one run.

- ``cold``: a fresh ``python -m compat.rank.worker`` process per rank per cell (imports everything);
- ``fork``: a fresh process per rank per cell, forked from the fork server (CPU only);
- ``warm``: rank groups kept from cell to cell (``compat.launch.pool``), after one pass that starts them.

Cells run one at a time, so the figures are the cells' own. Prints the machine, the versions, each
cell's wall time per mode and the speed-up, rank 0's peak host and GPU memory (a warm rank's: since
its group started), and the per-step split of the steps inside the ranks;
``--output`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compat.report.vocabulary import status_text

__all__ = ["add_parser", "main"]

MODES = ("cold", "fork", "warm")


def add_parser(sub: Any, run_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    b = sub.add_parser("bench", help="time cells with cold, forked and warm ranks, side by side")
    run_arguments(b)
    b.add_argument("--modes", default=",".join(MODES), help=f"which of {', '.join(MODES)} (default: all)")
    b.add_argument("--output", type=Path, help="also write the figures as JSON")


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
    print(f"bench on {config.device} ({config.backend}); {config.versions_line()}")
    print(f"{len(config.cells)} cells, one at a time; modes: {', '.join(modes)}", flush=True)
    if "fork" in modes:  # started once per run, before any cell: not a cell's cost
        from compat.launch import forkserver

        start = time.monotonic()
        forkserver.start()
        print(f"fork server started in {time.monotonic() - start:.1f} s (once per run)", flush=True)
    figures = {mode: _run_mode(mode, config) for mode in modes}
    text = table(figures, [c.id for c in config.cells])
    print(text)
    if args.output:
        data = {"device": config.device, "backend": config.backend, "versions": config.versions, "figures": figures}
        args.output.write_text(json.dumps(data, indent=1) + "\n")
    return 0


def _run_mode(mode: str, config: Any) -> dict[str, dict[str, Any]]:
    from compat.launch.launcher import run_cell
    from compat.launch.pool import Pool

    ranks = Pool(mode)
    workdir = Path(tempfile.mkdtemp(prefix=f"compat-bench-{mode}-"))
    out: dict[str, dict[str, Any]] = {}
    try:
        passes = 2 if mode == "warm" else 1  # the first warm pass starts the groups
        for n in range(passes):
            for cell in config.cells:
                start = time.monotonic()
                r = run_cell(
                    cell,
                    config.backend,
                    config.expected(cell),
                    config.timeout,
                    workdir,
                    plugins=config.plugins,
                    ranks=ranks,
                )
                wall = time.monotonic() - start
                if n == passes - 1:
                    steps = r.metrics.get("seconds_by_step", {})
                    memory = r.metrics.get("peak_memory", {})
                    out[cell.id] = {"seconds": round(wall, 2), "status": r.status, "met": r.met, "steps": steps}
                    out[cell.id]["peak_memory"] = memory
                    print(f"  {mode:5} {cell.id:40} {wall:7.2f} s  {status_text(r.status, r.met)}", flush=True)
                elif n == 0 and passes > 1:
                    print(f"  {mode:5} {cell.id:40} {wall:7.2f} s  (starting groups)", flush=True)
    finally:
        ranks.shutdown()
    return out


def table(figures: dict[str, dict[str, dict[str, Any]]], ids: list[str]) -> str:
    """Wall seconds per cell and mode, the speed-up of warm over cold, then the warm per-step split."""
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
    for m in modes:
        steps = sorted({s for f in figures[m].values() for s in f["steps"]}, key=_step_order(figures[m]))
        if not steps:
            continue
        lines += ["", f"Steps inside the ranks, {m} (s, rank 0):", "", "| cell | " + " | ".join(steps) + " |"]
        lines.append("|" + " --- |" * (len(steps) + 1))
        for cid in ids:
            f = figures[m].get(cid, {}).get("steps", {})
            lines.append(f"| {cid} | " + " | ".join(f"{f[s]:.2f}" if s in f else "-" for s in steps) + " |")
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
