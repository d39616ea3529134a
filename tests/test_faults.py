"""Planted faults: every check of the harness fails on the fault it exists to catch.

Each fault of ``tests/faults/catalogue.py`` runs the smallest cell that shows it, with the fault
planted in the ranks through PYTHONPATH (``tests/faults/plant/sitecustomize.py``) and
``COMPAT_FAULT``: the cell must end ``fail`` with a reason that names the tensor or module, the
rank or layer, and the measured difference against the tolerance where there is one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from faults.catalogue import FAULTS, Fault

PLANT = Path(__file__).parent / "faults" / "plant"
REPO = Path(__file__).resolve().parents[1]
CHECK_FAULTS = [f for f in FAULTS if f.kind == "check"]


def plant(monkeypatch: pytest.MonkeyPatch, fault: str | None) -> None:
    """Ranks inherit this environment: the plant directory first on PYTHONPATH, the fault named."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLANT), str(REPO), *rest]))
    if fault is None:
        monkeypatch.delenv("COMPAT_FAULT", raising=False)
    else:
        monkeypatch.setenv("COMPAT_FAULT", fault)


def run(family: str, layout: str, backend: str, workdir: Path, timeout: float | None = None):
    from compat.cells import Cell
    from compat.launch import DEFAULT_TIMEOUT, run_cell
    from compat.layouts import Layout

    cell = Cell.make(family, Layout.parse(layout))
    return run_cell(cell, backend, timeout=timeout or DEFAULT_TIMEOUT, workdir=workdir)


def unmatched(fault: Fault, reason: str) -> list[str]:
    return [p for p in fault.expect if not re.search(p, reason, re.DOTALL)]


@pytest.mark.parametrize("fault", CHECK_FAULTS, ids=[f.name for f in CHECK_FAULTS])
def test_fault_is_caught(fault, monkeypatch, tmp_path, compat_backend, record_property):
    plant(monkeypatch, fault.name)
    result = run(fault.family, fault.layout, compat_backend, tmp_path, fault.timeout)
    missing = unmatched(fault, result.reason)
    record_property("fault", fault.name)
    record_property("caught", result.status == fault.status and not missing)
    record_property("message", result.reason.split("\n(files kept")[0])
    assert result.status == fault.status, f"{fault.about}: cell {result.status}, not {fault.status}: {result.reason}"
    assert not missing, f"{fault.about}: the reason lacks {missing}:\n{result.reason}"


def test_plant_is_inert_without_a_fault(monkeypatch, tmp_path, compat_backend):
    """The plant on PYTHONPATH with no COMPAT_FAULT changes nothing: the clean cell passes."""
    plant(monkeypatch, None)
    result = run("llama", "tp1", compat_backend, tmp_path)
    assert result.status == "pass", result.reason
