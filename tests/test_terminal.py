"""What ``compat run`` prints: each row once, first problems grouped, tracebacks only with -v, a summary.

Fed with the committed full CPU run (122 cells, expected fails and errors with their tracebacks, as
written on a developer's machine), through the same view the command uses.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import sysconfig
from pathlib import Path

import pytest

from compat.checks.upstream import HARNESS_ROOT, relative_paths
from compat.commands.gate_compare import _verdict
from compat.declare.cells import Cell
from compat.declare.expected import Expected
from compat.report import families_view as status
from compat.report.diff import diff, diff_markdown
from compat.report.html import html_report
from compat.report.markdown import markdown
from compat.report.terminal import RunView, duration
from compat.report.vocabulary import grid_report
from compat.results.record import CellResult

FULL = HARNESS_ROOT / "matrix/results/cpu-x86_64-2cores-full-2026-11-26.json"


_GATE_KINDS = ("regressions", "unmet", "changed", "problems", "fixes", "new")


def _results() -> list[CellResult]:
    return [CellResult.from_dict(c) for c in json.loads(FULL.read_text())["cells"]]


def _printed(results: list[CellResult], verbosity: int = 0) -> str:
    out = io.StringIO()
    with RunView([r.id for r in results], verbosity, out=out, jobs=2) as view:
        for r in results:
            view.started(r.id)
            view.finished(r)
        view.close(results)
    return out.getvalue()


def test_each_cell_once_no_traceback_and_problems_grouped() -> None:
    results = _results()
    text = _printed(results)
    lines = text.splitlines()
    for r in results:
        assert sum(line.startswith(r.id + " ") for line in lines) == 1, r.id
    assert "Traceback" not in text and 'File "' not in text
    assert len(lines) == 1 + len(results) + 2  # header, one row per cell (skipped checks on it), blank, summary
    assert sum("check skipped: " in line for line in lines) == 1, "the same skipped check is spelled once"
    numbered = re.findall(r"  \[(\d+)\] (.+?)  \[\d+/\d+\]$", text, re.M)
    texts = [t for _, t in numbered]
    assert texts and len(texts) == len(set(texts)), "each first problem is spelled out once"
    assert sum(bool(re.search(r"  \[\d+\]  \[\d+/\d+\]$", line)) for line in lines) > 0, "repeats cite the number"
    assert lines[-1].startswith(f"{len(results)} cells in ") and " 0 unmet" in lines[-1]


def test_verbose_shows_the_traceback_quiet_only_unmet() -> None:
    results = _results()
    assert "Traceback (most recent call last)" in _printed(results, verbosity=1)
    results[3] = dataclasses.replace(results[3], met=False, expected="pass", status="fail", reason="planted miss")
    quiet = _printed(results, verbosity=-1).splitlines()
    assert [line.split()[0] for line in quiet if line and not line[0].isdigit()] == [results[3].id, "unmet"]


def test_summary_says_what_an_unmet_cell_missed() -> None:
    r = _results()[0]
    by_status = dataclasses.replace(r, status="fail", expected="pass", met=False, reason="logits differ\nmore")
    by_reason = dataclasses.replace(
        r,
        id="x.tp1",
        status="fail",
        expected="fail",
        met=False,
        reason="other problem",
        expected_matches=["has no adapter"],
    )
    tail = _printed([by_status, by_reason]).splitlines()[-2:]
    assert tail == [
        f"unmet {r.id}: expected pass, got fail: logits differ",
        "unmet x.tp1: expected fail matching 'has no adapter', got fail: other problem",
    ]


def test_a_served_cell_is_one_row_with_its_serving_figures() -> None:
    """A served cell is one row, with its serving check's status and figures in it."""
    served = json.loads((Path(__file__).parent / "records" / "served-vllm-cpu.json").read_text())["cells"]
    lines = _printed([CellResult.from_dict(c) for c in served]).splitlines()
    assert len(lines) == 1 + len(served) + 2 + 1  # header, rows, blank, summary, the unmet cell
    assert "serving.vllm pass (max diff 4.8e-07, effect 6.9e-01)  [1/4]" in lines[1]
    assert "serving.vllm fail (max diff -, effect -)  [1] use_dora is set" in lines[3]


def test_duration() -> None:
    assert [duration(s) for s in (4.4, 185, 3720)] == ["4 s", "3 min 05 s", "1 h 02 min"]


def test_written_reasons_name_files_relative_to_their_root() -> None:
    import peft

    upstream = Path(peft.__file__).resolve().parent / "peft_model.py"
    given = Path(sysconfig.get_paths()["purelib"]) / "torch" / "nn" / "modules" / "module.py"  # a venv symlink's
    text = f'File "{HARNESS_ROOT}/compat/cli.py", line 52\nFile "{upstream}", line 7\nFile "{given}", line 1'
    assert relative_paths(text).splitlines() == [
        'File "compat/cli.py", line 52',
        'File "peft/peft_model.py", line 7',
        'File "torch/nn/modules/module.py", line 1',
    ]
    cell = Cell.from_dict(
        {"family": "llama", "layout": {"tp": 1}, "load_layout": {"tp": 1}, "adapter": "lora", "dtype": "fp32"}
    )
    r = CellResult.of(cell, "error", text, 1.0, Expected("pass"))
    assert str(HARNESS_ROOT) not in r.reason and "compat/cli.py" in r.reason


def test_families_reads_results_beside_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert status.RESULTS_DIR.is_absolute() and status.RESULTS_DIR.is_dir()
    assert status.RESULTS_DIR.resolve() == (HARNESS_ROOT / "matrix" / "results").resolve()


def test_one_spelling_of_unmet_everywhere() -> None:
    data = json.loads(FULL.read_text())
    data["cells"] = data["cells"][:3]
    data["cells"][1].update(status="fail", met=False, reason="planted")
    old = json.loads(FULL.read_text())
    old["cells"] = old["cells"][:3]
    views = {
        "markdown": markdown(data),
        "html": html_report(data, "b.json"),
        "grid": grid_report([data]),
        "diff": diff_markdown(diff(old, data), "a", "b"),
        "gate": _verdict(data["cells"][1], {**{k: [] for k in _GATE_KINDS}, "unmet": [data["cells"][1]]}),
        "terminal": _printed([CellResult.from_dict({k: c[k] for k in c if k != "serving"}) for c in data["cells"]]),
    }
    for name, text in views.items():
        assert "unmet" in text, name
        for old_spelling in ("(unexpected)", "**unmet**", "(unmet)", "FAIL", "not a regression", "fail !"):
            assert old_spelling not in text, (name, old_spelling)


def test_v_prints_each_problem_on_a_line_of_its_own() -> None:
    """Reading a failure: the first problem is usually the cause, the others what it did to later checks."""
    r = dataclasses.replace(
        _results()[0],
        status="fail",
        met=False,
        reason="adapter_config.json: lora_alpha is 32, expected 16; logits differ",
        problems=[
            {"check": "files", "message": "adapter_config.json: lora_alpha is 32, expected 16", "where": ""},
            {"check": "logits", "message": "Megatron logits differ", "where": "load"},
        ],
    )
    printed = _printed([r], verbosity=1).splitlines()
    assert printed[2:4] == [
        "    [files] adapter_config.json: lora_alpha is 32, expected 16",
        "    [logits, load] Megatron logits differ",
    ]
