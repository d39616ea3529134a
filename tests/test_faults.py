"""Planted faults: every check of the harness fails on the fault it exists to catch, in fp32 and in bf16.

Each fault of ``tests/faults/catalogue.py`` runs the smallest cell that shows it, with the fault
planted in the ranks through PYTHONPATH (``tests/faults/plant/sitecustomize.py``) and
``COMPAT_FAULT``: the cell must end ``fail`` with a reason that names the tensor or module, the
rank or layer, and the measured difference against the tolerance where there is one. Both dtypes
of a fault share its environment, so they run in one xdist group (``--dist loadgroup``) and the
second one finds the first one's rank group warm.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from faults.catalogue import FAULTS, Fault

pytestmark = pytest.mark.cell

PLANT = Path(__file__).parent / "faults" / "plant"
REPO = Path(__file__).resolve().parents[1]
CHECKS = [
    pytest.param(f, dtype, id=f"{f.name}.{dtype}", marks=pytest.mark.xdist_group(f.name))
    for f in FAULTS
    if f.kind == "check"
    for dtype in f.dtypes
]


def plant(monkeypatch: pytest.MonkeyPatch, fault: str | None) -> None:
    """Ranks inherit this environment: the plant directory first on PYTHONPATH, the fault named."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLANT), str(REPO), *rest]))
    if fault is None:
        monkeypatch.delenv("COMPAT_FAULT", raising=False)
    else:
        monkeypatch.setenv("COMPAT_FAULT", fault)


def cell_of(fault: Fault, dtype: str = "fp32", adapter: str = "lora"):
    """The fault's cell: ``layout`` is the save layout, or ``save:load`` for a resharding cell."""
    from compat.declare.cells import Cell
    from compat.declare.layouts import Layout

    save, _, load = fault.layout.partition(":")
    load_layout = Layout.parse(load) if load else None
    return Cell.make(fault.family, Layout.parse(save), load_layout, adapter, dtype, sync=fault.sync)


def run(fault: Fault, backend: str, workdir: Path, dtype: str = "fp32", **kwargs):
    from compat.launch.launcher import DEFAULT_TIMEOUT, run_cell

    return run_cell(cell_of(fault, dtype), backend, timeout=fault.timeout or DEFAULT_TIMEOUT, workdir=workdir, **kwargs)


def unmatched(fault: Fault, reason: str, dtype: str = "fp32") -> list[str]:
    return [p for p in fault.patterns(dtype) if not re.search(p, reason, re.DOTALL)]


@pytest.mark.parametrize(("fault", "dtype"), CHECKS)
def test_fault_is_caught(fault, dtype, monkeypatch, tmp_path, compat_backend, record_property):
    plant(monkeypatch, fault.name)
    result = run(fault, compat_backend, tmp_path, dtype)
    missing = unmatched(fault, result.reason, dtype)
    record_property("fault", f"{fault.name}.{dtype}")
    record_property("caught", result.status == fault.status and not missing)
    record_property("message", result.reason)
    assert result.status == fault.status, f"{fault.about}: cell {result.status}, not {fault.status}: {result.reason}"
    assert not missing, f"{fault.about} ({dtype}): the reason lacks {missing}:\n{result.reason}"


def test_plant_is_inert_without_a_fault(monkeypatch, tmp_path, compat_backend):
    """The plant on PYTHONPATH with no COMPAT_FAULT changes nothing: the clean cell passes."""
    from faults.catalogue import by_name

    plant(monkeypatch, None)
    result = run(by_name("qk_rows_swapped"), compat_backend, tmp_path)
    assert result.status == "pass", result.reason


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_expected_failure_with_a_second_fault_is_unmet(dtype, monkeypatch, tmp_path, compat_backend):
    """llama.tp2.dora is expected to fail for its missing DoRA magnitudes; with lora_alpha doubled as well,
    the alpha problem is one no pattern covers: the cell is unmet and names it, and the checks after the file
    checks still run (peft loads the export, the logits are compared)."""
    from faults.catalogue import by_name

    from compat.declare.expected import load_expectations
    from compat.declare.versions import installed_versions
    from compat.launch.launcher import run_cell

    plant(monkeypatch, "lora_alpha_wrong")
    cell = cell_of(by_name("lora_alpha_wrong"), dtype, adapter="dora")
    expected = load_expectations(REPO / "matrix" / "expected.toml").for_cell(cell.id, installed_versions(), cell.spec)
    assert expected.status == "fail" and expected.match
    result = run_cell(cell, compat_backend, expected, workdir=tmp_path)
    assert result.status == "fail", result.reason
    assert not result.met
    assert [u for u in result.unmet if "lora_alpha is 32, expected 16" in u and u.startswith("not expected: [files]")]
    checks = {p["check"] for p in result.problems}
    assert {"files", "logits"} <= checks, checks  # peft loaded the export and the logits were compared


def test_an_expected_failure_for_another_reason_is_not_met(monkeypatch, tmp_path, compat_backend):
    """llama.tp2.dora is expected to fail for its missing DoRA magnitudes; with unprefixed keys planted it
    still fails, for another reason, and is not met: the status alone does not meet an expectation."""
    from faults.catalogue import by_name

    from compat.declare.expected import load_expectations
    from compat.declare.versions import installed_versions
    from compat.launch.launcher import run_cell

    plant(monkeypatch, "keys_unprefixed")
    cell = cell_of(by_name("keys_unprefixed"), adapter="dora")
    expected = load_expectations(REPO / "matrix" / "expected.toml").for_cell(cell.id, installed_versions(), cell.spec)
    assert expected.status == "fail" and expected.match
    result = run_cell(cell, compat_backend, expected, workdir=tmp_path)
    assert result.status == "fail", result.reason
    assert "tensors are not LoRA weight names peft loads" in result.reason
    assert not result.met and result.files is not None


def test_one_more_dropped_expert_in_an_expected_fail_ep_cell_is_unmet(monkeypatch, tmp_path, compat_backend):
    """qwen3_moe.ep2 is expected to fail for the experts EP loses (2 and 3 of every layer: 24 modules). With
    expert 1 dropped from the export too, the file check lists 36: unmet, naming the new tensors (before: met,
    the pattern keyed on the message's "e.g." covering any number of lost experts)."""
    from faults.catalogue import by_name

    from compat.declare.expected import load_expectations
    from compat.declare.versions import installed_versions
    from compat.launch.launcher import run_cell

    plant(monkeypatch, "expert_1_dropped")
    cell = cell_of(by_name("expert_1_dropped"))
    expected = load_expectations(REPO / "matrix" / "expected.toml").for_cell(cell.id, installed_versions(), cell.spec)
    assert expected.status == "fail" and cell.id == "qwen3_moe.ep2"
    result = run_cell(cell, compat_backend, expected, workdir=tmp_path)
    assert result.status == "fail", result.reason
    assert not result.met
    absent = [
        u for u in result.unmet if u.startswith("not expected: [files] the export has no adapter for 36 of the 64")
    ]
    assert absent and "12 of its 36 tensors are not named, e.g. model.layers.0.mlp.experts.1.down_proj" in absent[0]
