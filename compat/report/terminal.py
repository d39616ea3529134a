"""What ``compat run`` prints while cells run, as pytest does: one row per cell, a live line, a summary.

Each cell's row is printed once, when it finishes, on one line: its status, what was expected, its
figures, its serving checks' figures, its first problem and its skipped checks, each numbered so
that the next cell with the same text only repeats the number. The traceback of an error is in
results.json, and under its row with ``-v``; ``-q`` prints only the rows of unmet cells. On a
terminal a live line under the rows says how many cells are done, which run, the time elapsed and
an estimate of what is left; it is drawn by ``rich`` (``rich.live.Live``: it redraws one region in
place and prints the rows above it, handles the terminal's width, ``NO_COLOR`` and dumb terminals,
and is already in the lock as a dependency of the stack), so no escape code is written here.
Anywhere else (CI logs, a pipe) there is no live line: each row ends with its ``[done/total]``
count, as pytest's percentage does. The summary: counts, wall time, then one line per unmet cell
with what it was expected to be and what it missed. ``compat bench`` prints its modes through it too.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from types import TracebackType
from typing import IO, Any

from compat.report.vocabulary import UNMET, cells, headline, status_text, unmet_line
from compat.results.record import CellResult
from compat.results.skips import coverage_mark, coverage_note, skip_mark, skip_note

__all__ = ["RunView", "add_verbosity", "details", "duration", "row", "summary"]

_FIGURES = (("world", 5), ("status", len(f"unsupported {UNMET}")), ("expected", 11))
_NUMBERS = (("max diff", 8), ("effect", 8), ("judged", 9), ("seconds", 7))
PROBLEM_WIDTH = 160  # characters of a first problem on its row (the whole text is in results.json)


def add_verbosity(p: argparse.ArgumentParser) -> None:
    """``-q``/``-v`` as every command takes them: ``-q`` what missed and the summary, ``-v`` whole reasons."""
    p.set_defaults(verbosity=0)
    p.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, help="unmet and summary only")
    p.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, help="whole reasons, tracebacks")


def duration(seconds: float) -> str:
    """``45 s``, ``3 min 05 s``, ``1 h 02 min``: a wall time as people read it."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def header(id_width: int) -> str:
    names = [n.ljust(w) for n, w in _FIGURES] + [n.rjust(w) for n, w in _NUMBERS]
    return "  ".join(["cell".ljust(id_width), *names, "problem"])


def row(r: CellResult, id_width: int, problems: dict[str, int], count: str = "") -> str:
    """One line: the cell, its figures, its first problem and skipped checks (``[n] text`` the first
    time, ``[n]`` after).

    ``problems`` numbers the texts seen so far; a new one is added to it.
    """
    skipped = {"metrics": r.metrics}  # a check that did not run: marked and named on the row
    status = status_text(r.status + skip_mark(skipped), r.met)
    figures = [str(r.world_size).ljust(5), status.ljust(_FIGURES[1][1]), r.expected.ljust(11)]
    numbers = [_num(r.max_abs_diff).rjust(8), _num(r.adapter_effect).rjust(8), coverage_mark(skipped).rjust(9)]
    numbers.append(f"{r.seconds:.1f}".rjust(7))
    line = "  ".join([r.id.ljust(id_width), *figures, *numbers])
    for engine, s in r.serving.items():  # the serving checks' own figures, on the cell's row
        diff, effect = _num(s["max_abs_diff"]), _num(s["adapter_effect"])
        line += f"  serving.{engine} {s['status']} (max diff {diff}, effect {effect})"
    notes = [headline(r.reason, PROBLEM_WIDTH)] if r.status != "pass" and r.reason else []
    notes += [headline(skip_note(skipped), PROBLEM_WIDTH)] if skip_note(skipped) else []
    for first in notes:
        if first in problems:
            line += f"  [{problems[first]}]"
        else:
            problems[first] = len(problems) + 1
            line += f"  [{problems[first]}] {first}"
    return f"{line}  {count}".rstrip()


def details(r: CellResult) -> list[str]:
    """What ``-v`` prints under a row: each problem on a line of its own, ``[check, where] message`` (the
    first is usually the cause, the rest what it did to later checks), an error's whole reason with its
    traceback, the skipped checks, and which oracles judged how many adapted weights."""
    out: list[str] = []
    if r.status != "pass":
        for p in r.problems:
            where = ", ".join(x for x in (p.get("check", ""), p.get("where", "")) if x)
            out.append(f"[{where}] {p.get('message', '')}")
        if r.reason and (r.status == "error" or not r.problems):
            out.append(r.reason)
    cell = {"metrics": r.metrics}
    return [t for t in [*out, skip_note(cell), coverage_note(cell)] if t]


def summary(results: list[CellResult], wall: float, jobs: int = 1, title: str = "") -> list[str]:
    """The last lines: counts and wall time, then each unmet cell with what it was expected to be;
    ``title`` names the run where a command makes several (``compat bench``: one per mode)."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    unmet = [r for r in results if not r.met]
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    lines = [
        f"{title + ': ' if title else ''}{cells(len(results))} in {duration(wall)} ({jobs} at a time): {parts}; "
        f"{len(results) - len(unmet)} met, {len(unmet)} {UNMET}; "
        f"{sum(bool(skip_note({'metrics': r.metrics})) for r in results)} with checks skipped"
    ]
    lines += [unmet_line(r.id, r.expected, r.expected_matches, r.status, r.reason, PROBLEM_WIDTH) for r in unmet]
    return lines


class RunView:
    """The rows, the live line and the summary of one run; thread-safe (cells finish on worker threads)."""

    def __init__(
        self, ids: list[str], verbosity: int = 0, out: IO[str] | None = None, jobs: int = 1, title: str = ""
    ) -> None:
        self.out, self.title = out or sys.stdout, title
        self.total, self.verbosity, self.jobs = len(ids), verbosity, jobs
        self.id_width = max([len("cell"), *(len(i) for i in ids)])
        self.problems: dict[str, int] = {}
        self.running: dict[str, float] = {}
        self.done = 0
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._live: Any = None

    def __enter__(self) -> RunView:
        if self.verbosity >= 0:
            self._print(header(self.id_width))
        if self.out.isatty():
            from rich.console import Console
            from rich.live import Live
            from rich.text import Text

            self._live = Live(
                console=Console(file=self.out, highlight=False),
                get_renderable=lambda: Text(self.progress(), no_wrap=True, overflow="ellipsis"),
                transient=True,
                refresh_per_second=2,
            )
            self._live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.stop()

    def progress(self) -> str:
        """``12/71 done · running: a, b · 1 min 02 s elapsed · about 2 min 10 s left``."""
        with self._lock:
            done, running = self.done, sorted(self.running, key=self.running.__getitem__)
        elapsed = time.monotonic() - self.start
        text = f"{done}/{self.total} done"
        if running:
            text += f" · running: {', '.join(running)}"
        text += f" · {duration(elapsed)} elapsed"
        if 0 < done < self.total:
            text += f" · about {duration(elapsed / done * (self.total - done))} left"
        return text

    def started(self, cell_id: str) -> None:
        with self._lock:
            self.running[cell_id] = time.monotonic()

    def finished(self, r: CellResult) -> None:
        with self._lock:
            self.running.pop(r.id, None)
            self.done += 1
            count = "" if self._live else f"[{self.done}/{self.total}]"
            text = row(r, self.id_width, self.problems, count)
        if self.verbosity < 0 and r.met:
            return
        self._print(text)
        for text in details(r) if self.verbosity > 0 else ():
            self._print("    " + text.strip().replace("\n", "\n    "))

    def close(self, results: list[CellResult]) -> float:
        """Print the summary; returns the wall time."""
        wall = time.monotonic() - self.start
        if self._live is not None:
            self._live.stop()
            self._live = None
        self._print("")
        for line in summary(results, wall, self.jobs, self.title):
            self._print(line)
        return wall

    def _print(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.out, flush=True)
