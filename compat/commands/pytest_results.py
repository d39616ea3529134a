"""``--compat-results``: every selected cell in results.json, the crashed ones too, and the selection.

A cell whose rank group or pytest worker died mid-cell, or whose test errored in setup, has no
result of its own: it is recorded ``error`` with the crash text (xdist reports a dead worker's test
as ``when="???"``). ``complete`` is false while any selected cell lacks a result of its own, or any
selected test reported nothing, and the file is written even when none has one, so an old
results.json never survives a run that made none.

A test's cell is the one stored on its item at collection (``user_properties``, which every report of
the test carries to the xdist controller), not a part of its node id: with a second parametrization
the id reads ``[llama.tp2-other]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

__all__ = ["CELL_PROPERTY", "ResultsCollector"]

CELL_PROPERTY = "compat_cell"  # the id of the cell a test runs, in its item's and reports' user_properties


class ResultsCollector:
    """Collects the cells' results of this session where the reports arrive (the xdist controller too)
    and writes ``--compat-results`` at the end, from the controller only."""

    def __init__(self, config: pytest.Config, path: Path, session_of: Callable[[pytest.Config], Any]) -> None:
        self.config, self.path, self._session_of = config, path, session_of
        self.results: dict[str, dict[str, Any]] = {}  # cell id -> result
        self.cells: dict[str, str] = {}  # node id of a selected compat_cell test -> its cell id
        self.collected: set[str] = set()  # node ids of every selected test
        self.reported: set[str] = set()  # node ids of the tests that reported anything
        self.crashed: set[str] = set()  # cell ids recorded from a crash, without a result of their own
        self.unknown: set[str] = set()  # node ids that crashed before saying which cell they run

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Store each compat_cell test's cell id on its item (in xdist's workers too): its reports carry it."""
        for item in items:
            spec = getattr(item, "callspec", None)
            cell = spec.params.get("compat_cell") if spec is not None else None
            if cell is not None:
                item.user_properties.append((CELL_PROPERTY, cell.id))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Without xdist: the items left after -k, -m and deselection."""
        self.collected |= {i.nodeid for i in session.items}
        self.cells |= {i.nodeid: str(v) for i in session.items for k, v in i.user_properties if k == CELL_PROPERTY}

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        """On the xdist controller: what each worker collected (it applies -k and -m); which cell each
        test runs comes with its reports."""
        self.collected |= set(ids)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reported.add(report.nodeid)
        # what the compat_run fixture attached: a CellResult as a dict (compat.pytest_plugin)
        recorded = [cast("dict[str, Any]", value) for key, value in report.user_properties if key == "compat_result"]
        for value in recorded if report.when == "call" else []:
            self.results[value["id"]] = value
        cell = next((str(v) for k, v in report.user_properties if k == CELL_PROPERTY), self.cells.get(report.nodeid))
        if cell is not None:
            self.cells[report.nodeid] = cell
        if report.failed and not recorded and cell and cell not in self.results:
            self.results[cell] = self._crashed(cell, report)
            self.crashed.add(cell)
        elif report.failed and cell is None and str(report.when) == "???":  # xdist's report of a crashed worker
            self.unknown.add(report.nodeid)

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
        selected = set(self.cells.values())
        missing = sorted((selected - set(self.results)) | self.crashed)
        missing += sorted(self.unknown | (self.collected - self.reported))  # tests that never said which cell
        complete = session.shouldstop is False and session.shouldfail is False and not missing and bool(results)
        matrix = self.config.getoption("--compat-matrix") or self.config.getini("compat_matrix") or ""
        selection = {
            "matrix": str(matrix),
            "k": self.config.getoption("keyword") or "",
            "m": self.config.getoption("markexpr") or "",
            "cells": len(selected),
            "without_result": missing,
        }
        write_results(self.path, results, s.backend, device_name(s.backend), installed_versions(), complete, selection)
