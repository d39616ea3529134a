"""``--compat-results``: every selected cell in results.json, the crashed ones too, and the selection.

A cell whose rank group or pytest worker died mid-cell, or whose test errored in setup, has no
result of its own: it is recorded ``error`` with the crash text (xdist reports a dead worker's test
as ``when="???"``). ``complete`` is false while any selected cell lacks a result of its own, and the file is
written even when none has one, so an old results.json never survives a run that made none.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

__all__ = ["ResultsCollector"]

_PARAM = re.compile(r"\[(?P<id>[^\[\]]+)\]$")


class ResultsCollector:
    """Collects the cells' results of this session where the reports arrive (the xdist controller too)
    and writes ``--compat-results`` at the end, from the controller only."""

    def __init__(self, config: pytest.Config, path: Path, session_of: Callable[[pytest.Config], Any]) -> None:
        self.config, self.path, self._session_of = config, path, session_of
        self.results: dict[str, dict[str, Any]] = {}  # cell id -> result
        self.selected: set[str] = set()  # cell ids of the selected compat_cell tests
        self.crashed: set[str] = set()  # cell ids recorded from a crash, without a result of their own

    def _cell_id(self, nodeid: str) -> str | None:
        m = _PARAM.search(nodeid)
        known = {c.id for c in self._session_of(self.config).cells}
        return m["id"] if m and m["id"] in known else None

    def _select(self, nodeids: list[str]) -> None:
        self.selected |= {cell for n in nodeids if (cell := self._cell_id(n))}

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Without xdist: the items left after -k, -m and deselection."""
        self._select([i.nodeid for i in session.items if "compat_cell" in getattr(i, "fixturenames", ())])

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        """On the xdist controller: what each worker collected (it applies -k and -m)."""
        self._select(list(ids))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # what the compat_run fixture attached: a CellResult as a dict (compat.pytest_plugin)
        recorded = [cast("dict[str, Any]", value) for key, value in report.user_properties if key == "compat_result"]
        for value in recorded if report.when == "call" else []:
            self.results[value["id"]] = value
        cell = self._cell_id(report.nodeid)
        if report.failed and not recorded and cell and cell not in self.results:
            self.results[cell] = self._crashed(cell, report)
            self.crashed.add(cell)

    def _crashed(self, cell_id: str, report: pytest.TestReport) -> dict[str, Any]:
        """An ``error`` record for a cell whose test broke before its result was attached."""
        from dataclasses import asdict

        from compat.checks.problems import Problem
        from compat.declare.versions import installed_versions
        from compat.results.record import CellResult

        s = self._session_of(self.config)
        cell = next(c for c in s.cells if c.id == cell_id)
        when: str | None = report.when  # xdist's report of a crashed worker says "???", outside pytest's Literal
        phase = "the pytest worker running it crashed" if when == "???" else f"its test failed in {when}"
        text = report.longreprtext or "(no output)"
        problem = Problem("run", f"{phase}: {text.strip().splitlines()[-1][:300] if text.strip() else ''}")
        expected = s.expectations.for_cell(cell.id, installed_versions(), cell.spec)
        return asdict(CellResult.of(cell, "error", f"{phase}:\n{text[-4000:]}", 0.0, expected, {}, [problem]))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return
        from compat.declare.versions import installed_versions
        from compat.results.record import CellResult, device_name, write_results

        s = self._session_of(self.config)
        order = {c.id: i for i, c in enumerate(s.cells)}
        results = sorted(
            (CellResult.from_dict(r) for r in self.results.values()), key=lambda r: (order.get(r.id, len(order)), r.id)
        )
        missing = sorted((self.selected - set(self.results)) | self.crashed)
        complete = session.shouldstop is False and session.shouldfail is False and not missing and bool(results)
        matrix = self.config.getoption("--compat-matrix") or self.config.getini("compat_matrix") or ""
        selection = {
            "matrix": str(matrix),
            "k": self.config.getoption("keyword") or "",
            "m": self.config.getoption("markexpr") or "",
            "cells": len(self.selected),
            "without_result": missing,
        }
        write_results(self.path, results, s.backend, device_name(s.backend), installed_versions(), complete, selection)
