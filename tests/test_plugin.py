"""The pytest plugin as a downstream repository uses it, driven through ``pytester``.

Collection ids, the registered ``cell`` marker, strict xfail, usage errors for bad files and bad
plugin names, an exporter injected through the ini file, and ``--compat-results`` written by the
xdist controller.
"""

from __future__ import annotations

import json
import os

import pytest

# Imported here, outside the runs: pytester's in-process runs drop modules they imported, and torch's
# C extension cannot be imported twice in one process.
torch = pytest.importorskip("torch")

pytest_plugins = ["pytester"]

MATRIX = '[[cells]]\nfamilies = ["llama"]\nlayouts = ["tp1", "tp=2"]\n'
TEST = "def test_cell(compat_cell, compat_run):\n    compat_run(compat_cell).assert_met()\n"

# A checkpoint manager's exporter with a bug a person could write: it drops one module's lora_B.
EXPORTER = """
from safetensors.torch import load_file, save_file

from compat.rank.export import default_exporter


def drops_one_lora_b(bridge, model, peft, path, base):
    default_exporter(bridge, model, peft, path, base)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        tensors = load_file(path / "adapter_model.safetensors")
        del tensors["base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"]
        save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    dist.barrier()
"""


@pytest.fixture
def repo(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".toml", m=MATRIX)
    pytester.makepyfile(test_m=TEST)
    return pytester


def test_cells_are_tests_named_by_their_ids(repo):
    result = repo.runpytest("--collect-only", "-q", "--compat-matrix", "m.toml")
    result.stdout.fnmatch_lines(["test_m.py::test_cell[[]llama.tp1[]]", "test_m.py::test_cell[[]llama.tp2[]]"])
    assert result.ret == 0


def test_the_cell_marker_is_registered(repo):
    repo.makepyfile(test_marked="import pytest\n\n@pytest.mark.cell\ndef test_x():\n    pass\n")
    result = repo.runpytest("--strict-markers", "-W", "error::pytest.PytestUnknownMarkWarning", "test_marked.py")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compat-matrix", "nope.toml"], "matrix file * does not exist"),
        (["--compat-matrix", "m.toml", "--compat-families", "nope.toml"], "*family declarations file * does not exist"),
        (["--compat-matrix", "m.toml", "--compat-exporter", "nosuchpackage.mod:export"], "*does not import*"),
        (["--compat-matrix", "m.toml", "--compat-exporter", "not a name"], "*is not 'package.module:function'*"),
    ],
)
def test_bad_input_is_a_usage_error(repo, args, message):
    result = repo.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*megatron-lora-compat: {message}"])


@pytest.mark.cell
def test_an_expected_failure_that_passes_fails_the_suite(repo):
    """When upstream fixes an expected failure, the suite says so: assert_met itself fails the test (before, the
    strict xfail mark did, as XPASS, and nothing did under --runxfail: a plain pass)."""
    expected = '[[expect]]\ncells = "llama.tp1"\nstatus = "fail"\nreason = "planted"\nmatch = "x"\n'
    repo.makefile(".toml", expected=expected)
    for runxfail in (("--runxfail",), ()):
        result = repo.runpytest("--compat-matrix", "m.toml", "-k", "tp1", *runxfail)
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*llama.tp1 passed, but is expected fail: planted*"])


@pytest.mark.cell
def test_an_exporter_named_in_the_ini_is_judged_by_every_check(repo, monkeypatch):
    repo.makepyfile(myexport=EXPORTER)
    repo.makeini("[pytest]\ncompat_matrix = m.toml\ncompat_exporter = myexport:drops_one_lora_b\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo.path), os.environ.get("PYTHONPATH", "")]))
    result = repo.runpytest("-k", "tp1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*llama.tp1 fail: model.layers.2.mlp.down_proj: lora_B is missing*"])


@pytest.mark.cell
def test_results_json_is_written_by_the_xdist_controller(repo):
    result = repo.runpytest("--compat-matrix", "m.toml", "-n", "2", "--compat-results", "r.json", "-p", "xdist")
    result.assert_outcomes(passed=2)
    data = json.loads((repo.path / "r.json").read_text())
    assert data["complete"] is True and data["backend"] == "cpu"
    assert [c["id"] for c in data["cells"]] == ["llama.tp1", "llama.tp2"]
    assert all(c["status"] == "pass" and c["spec"] == "local" for c in data["cells"])


CRASHES = """
import os, signal, threading

import pytest


@pytest.fixture(autouse=True)
def broken_setup(request):
    if request.node.callspec.id == "llama.tp1":
        raise RuntimeError("planted: setup breaks")


def test_cell(compat_cell, compat_run):
    if compat_cell.id == "llama.tp2":
        threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGKILL)).start()  # the worker dies mid-cell
    compat_run(compat_cell).assert_met()
"""


@pytest.mark.cell
def test_a_worker_killed_mid_cell_and_a_setup_error_leave_error_records(repo):
    """A worker killed mid-cell and a test that errors in setup each leave an ``error`` record; the results file
    is rewritten (no stale r.json survives) and says ``complete`` false while a cell lacks a result."""
    (repo.path / "r.json").write_text('{"complete": true, "cells": []}')
    data, cells = _run_with_a_crash(repo, CRASHES, errors=1, failed=1)
    assert sorted(data["selection"]["without_result"]) == ["llama.tp1", "llama.tp2"]
    assert cells["llama.tp1"]["status"] == "error" and "planted: setup breaks" in cells["llama.tp1"]["reason"]
    assert not cells["llama.tp1"]["met"] and cells["llama.tp1"]["problems"][0]["check"] == "run"


@pytest.mark.cell
def test_a_narrowed_run_records_its_selection(repo):
    result = repo.runpytest("--compat-matrix", "m.toml", "-k", "tp1", "--compat-results", "r.json")
    result.assert_outcomes(passed=1)
    data = json.loads((repo.path / "r.json").read_text())
    assert data["complete"] is True and data["selection"]["k"] == "tp1" and data["selection"]["cells"] == 1


@pytest.mark.cell
def test_an_exporter_passed_as_a_function_runs_by_its_name(repo, monkeypatch):
    """As a new user writes it: ``compat_run(cell, exporter=my_function)``; a lambda is refused, not run."""
    repo.makepyfile(myexport=EXPORTER)
    repo.makepyfile(
        test_m="from myexport import drops_one_lora_b\n\n"
        "def test_cell(compat_cell, compat_run):\n"
        "    compat_run(compat_cell, exporter=drops_one_lora_b).assert_met()\n\n"
        "def test_lambda(compat_cell, compat_run):\n"
        "    compat_run(compat_cell, exporter=lambda *args: None)\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(repo.path), os.environ.get("PYTHONPATH", "")]))
    result = repo.runpytest("--compat-matrix", "m.toml", "-k", "tp1")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*llama.tp1 fail: model.layers.2.mlp.down_proj: lora_B is missing*",
            "*exporter test_m.test_lambda.<locals>.<lambda> cannot be imported by name in the ranks*",
        ],
        consecutive=False,
    )


def test_a_pass_expected_unsupported_does_not_pass_assert_met():
    """``assert_met`` raises for a pass that was expected ``unsupported``, as the CLI counts it unmet."""
    from compat.declare.cells import Cell
    from compat.declare.expected import Expected
    from compat.declare.layouts import Layout
    from compat.pytest_plugin import CellDidNotPass, CompatResult
    from compat.results.record import CellResult

    cell = Cell.make("minimax_m2", Layout.parse("tp1"), None, "lora", "fp32")
    result = CellResult.of(cell, "pass", "", 1.0, Expected("unsupported", "needs transformer_engine", ("needs",)))
    assert not result.met
    with pytest.raises(CellDidNotPass, match="passed, but is expected unsupported"):
        CompatResult(result).assert_met()
    CompatResult(CellResult.of(cell, "pass", "", 1.0, Expected())).assert_met()


@pytest.mark.parametrize("expected", ["fail", "error"])
def test_a_pass_expected_to_fail_does_not_pass_assert_met(expected):
    """Before: ``assert_met`` returned on a pass expected to fail, leaving it to the xfail mark: a plain pass
    under --runxfail or in a test that takes its cells elsewhere."""
    from compat.declare.cells import Cell
    from compat.declare.expected import Expected
    from compat.declare.layouts import Layout
    from compat.pytest_plugin import CellDidNotPass, CellErrored, CellFailed, CompatResult
    from compat.results.record import CellResult

    cell = Cell.make("llama", Layout.parse("tp1"), None, "lora", "fp32")
    result = CellResult.of(cell, "pass", "", 1.0, Expected(expected, "planted", ("x",)))
    with pytest.raises(CellDidNotPass, match=f"passed, but is expected {expected}: planted") as raised:
        CompatResult(result).assert_met()
    assert not isinstance(raised.value, CellFailed | CellErrored)  # what the strict xfail marks expect


SECOND_PARAMETRIZATION = """
import os, signal, threading

import pytest


@pytest.mark.parametrize("variant", ["plain"])
def test_cell(compat_cell, compat_run, variant):
    if compat_cell.id == "llama.tp2":
        threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGKILL)).start()  # the worker dies mid-cell
    compat_run(compat_cell).assert_met()
"""


@pytest.mark.cell
def test_a_second_parametrization_still_tracks_a_crashed_cell(repo):
    """Node ids read ``test_cell[llama.tp2-plain]``: before, the collector parsed the cell id from them, found no
    cell, lost the crashed one and wrote ``complete: true``."""
    data, cells = _run_with_a_crash(repo, SECOND_PARAMETRIZATION, passed=1, failed=1)
    assert data["selection"]["without_result"] == ["llama.tp2"]
    assert cells["llama.tp1"]["status"] == "pass"


def _run_with_a_crash(repo, source: str, **outcomes: int) -> tuple[dict, dict[str, dict]]:
    """``source`` run over two cells under xdist, its worker killed in llama.tp2: the outcomes, then the results
    file incomplete with an ``error`` record for the crashed cell. Returns the file and its cells by id."""
    repo.makepyfile(test_m=source)
    result = repo.runpytest("--compat-matrix", "m.toml", "-n", "2", "--compat-results", "r.json", "-p", "xdist")
    result.assert_outcomes(**outcomes)
    data = json.loads((repo.path / "r.json").read_text())
    cells = {c["id"]: c for c in data["cells"]}
    assert data["complete"] is False and data["selection"]["cells"] == 2
    assert cells["llama.tp2"]["status"] == "error" and "crashed" in cells["llama.tp2"]["reason"]
    return data, cells
