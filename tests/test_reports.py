"""Reports of a results.json: heatmap PNG, HTML page, diff of two runs, family x layout text grid."""

from __future__ import annotations

import copy
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from compat.cli import main
from compat.report.diff import diff, diff_markdown
from compat.report.heatmap import heatmap
from compat.report.html import html_report
from compat.report.side_by_side import side_by_side
from compat.report.vocabulary import family_grid, grid_from_results, grid_report, layout_slug

FULL = Path(__file__).resolve().parent.parent / "matrix/results/cpu-x86_64-2cores-full-2026-11-26.json"
ONE = {"tp": 1, "pp": 1, "ep": 1, "etp": 1, "vpp": 1}


def _cell(family: str, status: str = "pass", met: bool = True, diff_: float | None = 2.4e-7, **kw: Any) -> dict:
    layout = {**ONE, **kw.pop("layout", {})}
    load = {**ONE, **kw.pop("load_layout", layout)}
    adapter, dtype = kw.pop("adapter", "lora"), kw.pop("dtype", "fp32")
    slug, load_slug = layout_slug(layout), layout_slug(load)
    cid = ".".join(
        [family, slug]
        + ([f"to.{load_slug}"] if load_slug != slug else [])
        + ([adapter] if adapter != "lora" else [])
        + (["te"] if kw.get("spec") == "te" else [])
        + ([dtype] if dtype != "fp32" else [])
    )
    expected = status if met else "pass"
    return {
        "id": cid,
        "family": family,
        "layout": layout,
        "load_layout": load,
        "world_size": 1,
        "adapter": adapter,
        "dtype": dtype,
        "status": status,
        "expected": expected,
        "met": met,
        "max_abs_diff": diff_,
        "adapter_effect": 0.6,
        "seconds": 3.0,
        "reason": "",
        "expected_reason": "",
        "metrics": {},
        **kw,
    }


@pytest.fixture
def results() -> dict[str, Any]:
    cells = [
        _cell("llama"),
        _cell("llama", layout={"tp": 2}),
        _cell("llama", layout={"tp": 2}, load_layout=ONE),
        _cell("llama", dtype="bf16", diff_=5.9e-3),
        _cell("qwen3_moe"),
        _cell(
            "qwen3_moe", "fail", diff_=None, layout={"ep": 2}, reason="export has no adapter <script>alert(1)</script>"
        ),
        _cell(
            "qwen3_moe", "error", met=False, diff_=None, layout={"tp": 2}, reason="rank 1 raised\nKeyError: 'x' & co"
        ),
        _cell("gemma3", "unsupported", diff_=None, reason="needs transformer_engine"),
        _cell("gemma3", spec="te", dtype="bf16"),
    ]
    return {
        "finished_at": "2026-11-26T11:00:00+00:00",
        "device": "x86_64 CPU, 16 cores",
        "backend": "cpu",
        "versions": {"torch": "2.11.0", "peft": "0.21.2"},
        "transformer_engine": None,
        "cells": cells,
    }


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_heatmap_panels_and_png(results: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "h.png"
    titles = heatmap(results, out)
    assert titles == ["lora / fp32 / local", "lora / bf16 / local", "lora / bf16 / te"]
    w, h = _png_size(out)
    assert 600 <= w <= 4000 and 300 <= h <= 4000, (w, h)


def test_heatmap_of_committed_full_run(tmp_path: Path) -> None:
    data = json.loads(FULL.read_text())
    out = tmp_path / "full.png"
    titles = heatmap(data, out)
    assert titles[0] == "lora / fp32 / local"
    assert {"lora / bf16 / local", "dora / fp32 / local", "moe-normalized / fp32 / local"} <= set(titles)
    assert len(titles) == len({(c["adapter"], c["dtype"], c.get("spec", "local")) for c in data["cells"]})
    w, h = _png_size(out)
    assert w > 1500 and h > 700, (w, h)  # 9 panels, one of 4 families x 24 columns
    assert out.stat().st_size > 50_000


def test_heatmap_marks_a_square_whose_cell_skipped_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The square's text as drawn (the figure caught as heatmap closes it): ``~N`` for N checks skipped."""
    import matplotlib.pyplot as plt

    drawn: list[Any] = []
    monkeypatch.setattr(plt, "close", drawn.append)
    skipped = _cell("llama", metrics={"skipped_checks": {"base model": "no enable/disable_adapter_layers"}})
    merged = {"merged": {"peft merge_and_unload": {"status": "skipped", "reason": "DoRA"}}}
    skipped_merged = _cell("llama", layout={"tp": 2}, metrics={**merged, "skipped_checks": {"bridge loader": "x"}})
    heatmap({"cells": [skipped, skipped_merged, _cell("qwen3")]}, tmp_path / "h.png")
    (fig,) = drawn
    squares = {t.get_text() for ax in fig.axes for t in ax.texts if t.get_text().startswith(("P", "F"))}
    assert squares == {"P~1 2.4e-7", "P~2 2.4e-7", "P 2.4e-7"}, squares
    header = " ".join(t.get_text() for t in fig.texts)
    assert "3 cells, 0 unmet, 2 with skipped checks." in header, header


def test_heatmap_of_no_cells(tmp_path: Path) -> None:
    assert heatmap({"cells": []}, tmp_path / "empty.png") == []
    _png_size(tmp_path / "empty.png")


def test_html_escapes_and_lists_every_cell(results: dict[str, Any], tmp_path: Path) -> None:
    png = tmp_path / "h.png"
    heatmap(results, png)
    page = html_report(results, "matrix/results/x.json", png)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "KeyError: &#x27;x&#x27; &amp; co" in page
    for cell in results["cells"]:
        assert f">{cell['id']}</td>" in page, cell["id"]
    assert page.count("<details>") == 3  # the expected fail, the unmet error, the unsupported cell
    assert "data:image/png;base64,iVBORw0KGgo" in page  # the PNG signature, base64
    assert re.search(r"<span[^>]*>1 unmet</span>", page)
    assert "2.11.0" in page and "x86_64 CPU, 16 cores" in page
    assert 'src="http' not in page and "<link" not in page  # self-contained
    # the unmet cell comes first in the table
    assert page.index(">qwen3_moe.tp2</td>") < page.index(">llama.tp1</td>")


def test_html_flags_incomplete_run(results: dict[str, Any]) -> None:
    assert "Incomplete run" not in html_report(results, "a.json", None)
    assert "Incomplete run" in html_report({**results, "complete": False}, "a.json", None)


def test_diff_finds_planted_changes(results: dict[str, Any]) -> None:
    after = copy.deepcopy(results)
    by_id = {c["id"]: c for c in after["cells"]}
    by_id["llama.tp2"].update(status="fail", met=False, max_abs_diff=0.07)
    by_id["llama.tp1.bf16"]["max_abs_diff"] = 5.9e-1  # 100x
    by_id["llama.tp1"]["max_abs_diff"] = 4.0e-7  # < 10x: noise, not reported
    after["cells"].remove(by_id["gemma3.tp1"])
    after["cells"].append(_cell("qwen2"))
    after["versions"]["torch"] = "2.12.0"
    d = diff(results, after)
    assert [(c.id, c.old_status, c.new_status, c.old_met, c.new_met) for c in d.status_changed] == [
        ("llama.tp2", "pass", "fail", True, False)
    ]
    assert [m.id for m in d.diff_moved] == ["llama.tp2", "llama.tp1.bf16"]
    assert d.diff_moved[1].factor == pytest.approx(100)
    assert d.added == ("qwen2.tp1",) and d.removed == ("gemma3.tp1",)
    assert d.versions_changed == (("torch", "2.11.0", "2.12.0"),)
    md = diff_markdown(d, "old.json", "new.json")
    assert md.startswith("**old.json → new.json:** 1 status change (1 newly unmet, 0 newly met); 1 added; 1 removed")
    assert "| llama.tp2 | pass → fail | met → unmet |" in md
    assert "| llama.tp1.bf16 | 5.90e-03 | 5.90e-01 | 100x |" in md
    assert "| llama.tp2 | 2.40e-07 | 7.00e-02 |" in md
    assert "llama.tp1 |" not in md.replace("llama.tp1.bf16 |", "")
    assert "torch 2.11.0 → 2.12.0" in md


def test_diff_none_to_number_and_identical(results: dict[str, Any]) -> None:
    same = diff(results, copy.deepcopy(results))
    assert not same.changed and same.status_changed == () and same.diff_moved == ()
    assert same.summary == f"no changes in {len(results['cells'])} common cells"
    after = copy.deepcopy(results)
    next(c for c in after["cells"] if c["id"] == "qwen3_moe.ep2")["max_abs_diff"] = 1e-3
    moved = diff(results, after).diff_moved
    assert [(m.id, m.old, m.new) for m in moved] == [("qwen3_moe.ep2", None, 1e-3)]
    assert "| qwen3_moe.ep2 | - | 1.00e-03 | new |" in diff_markdown(diff(results, after))


def test_grid_from_results_newest_wins_and_plain_only(results: dict[str, Any]) -> None:
    older = copy.deepcopy(results)
    older["finished_at"] = "2026-11-01T00:00:00+00:00"
    for c in older["cells"]:
        c.update(status="fail", met=False)
    older["cells"].append(_cell("mistral", layout={"pp": 2}))
    rows = grid_from_results([results, older])  # order given must not matter: finished_at decides
    assert rows["llama"] == {"tp1": "pass", "tp2": "pass"}
    assert rows["qwen3_moe"] == {"tp1": "pass", "ep2": "fail*", "tp2": "err unmet"}
    assert rows["gemma3"] == {"tp1": "unsup"}
    assert rows["mistral"] == {"pp2": "pass"}


def test_grid_takes_one_spec(results: dict[str, Any]) -> None:
    te = copy.deepcopy(results)
    for c in te["cells"]:
        c.update(spec="te", status="fail", met=True)
    both = [results, te]
    assert grid_from_results(both)["llama"] == {"tp1": "pass", "tp2": "pass"}
    assert grid_from_results(both, spec="te")["llama"] == {"tp1": "fail*", "tp2": "fail*"}


def test_family_grid_one_row_per_family(results: dict[str, Any]) -> None:
    text = grid_report([results])
    lines = text.splitlines()
    assert lines[0].split() == ["family", "tp1", "tp2", "ep2"]
    body = [line.split() for line in lines[2:5]]
    assert body == [
        ["llama", "pass", "pass", "-"],
        ["qwen3_moe", "pass", "err", "unmet", "fail*"],
        ["gemma3", "unsup", "-", "-"],
    ]
    assert lines[5] == ""
    assert text.rstrip().endswith(
        "3 other cells (other adapters, bf16, other spec or resharding) left out; see `compat report`"
    )


def test_family_grid_wraps_wide_grids() -> None:
    rows = {"llama": {f"tp{2**i}": "pass" for i in range(12)}, "gemma": {}}
    text = family_grid(rows, width=60)
    headers = [line for line in text.splitlines() if line.startswith("family")]
    assert len(headers) >= 2
    assert max(len(line) for line in text.splitlines()[:-1]) <= 60
    assert sum(line.startswith("gemma ") for line in text.splitlines()) == len(headers)  # empty row kept


def test_grid_of_committed_full_run() -> None:
    data = json.loads(FULL.read_text())
    text = grid_report([data])
    families = {c["family"] for c in data["cells"]}
    rows = [line.split()[0] for line in text.splitlines() if line.split() and line.split()[0] in families]
    assert sorted(rows) == sorted(families)
    assert "qwen3_moe  pass" in text


def test_side_by_side_matches_cells_across_specs_and_cites_why_they_differ() -> None:
    te = {"cells": [_cell("qwen3_moe", layout={"ep": 2}, spec="te"), _cell("llama", spec="te")]}
    local = {
        "cells": [
            _cell("qwen3_moe", "fail", diff_=None, layout={"ep": 2}, reason="export has no adapter for 24\nstack"),
            _cell("llama"),
        ]
    }
    text = side_by_side([te, local], ["te", "local"])
    assert "| qwen3_moe.ep2.te | pass 2.4e-07 | fail* | local [1] |" in text
    assert "| llama.tp1.te | pass 2.4e-07 | pass 2.4e-07 |  |" in text
    assert "1. export has no adapter for 24\n" in text
    assert "2 cells; 1 with outcomes that differ between runs." in text


def test_report_side_by_side_labels_must_name_every_file(tmp_path: Path, results: dict[str, Any]) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    assert main(["report", "--side-by-side", str(path), str(path), "--labels", "one"]) == 2


SKIPS = {
    "skipped_checks": {"bridge loader": "this megatron-bridge has no load_peft_adapter_checkpoint"},
    "merged": {"Megatron with adapters merged by the bridge": {"status": "skipped", "reason": "DoRALinear: no merge"}},
}


def test_a_pass_with_skipped_checks_is_shown_as_such_everywhere() -> None:
    """A pass with skipped checks (``metrics.skipped_checks``, skipped merged forms) is marked in every view."""
    from compat.report.markdown import markdown

    skipping = _cell("llama", metrics=SKIPS)
    data = {"cells": [skipping, _cell("qwen3")], "versions": {}}
    md = markdown(data)
    assert "pass (2 skipped)" in md and "no load_peft_adapter_checkpoint" in md and "DoRALinear: no merge" in md
    html = html_report(data, "r.json")
    assert "pass (2 skipped)" in html and "no load_peft_adapter_checkpoint" in html
    assert "(2 skipped)" in side_by_side([data, data], ["a", "b"])
    assert "(2 skipped)" in grid_report([data])
    unskipped = {**data, "cells": [_cell("llama"), _cell("qwen3")]}
    d = diff(unskipped, data)
    assert d.skips_changed and "bridge loader" in diff_markdown(d) and not d.outcome_changed


def test_the_terminal_row_names_the_skipped_checks() -> None:
    from compat.report.terminal import row, summary
    from compat.results.record import CellResult

    r = CellResult.from_dict(_cell("llama", metrics=SKIPS, spec="local"))
    line = row(r, 10, {})
    assert "pass (2 skipped)" in line and "2 checks skipped: " in line and "bridge loader (this" in line
    assert "1 with checks skipped" in summary([r], 1.0)[0]


def test_compat_diff_exits_1_on_a_status_or_problem_change(tmp_path: Path) -> None:
    """``compat diff`` exits 1 when a cell changed status or problems, 0 when nothing did."""
    before, after = tmp_path / "a.json", tmp_path / "b.json"
    problem = {"check": "files", "message": "use_dora is set but 28 of 28 modules carry no lora_magnitude_vector"}
    cell = _cell("llama", "fail", True, problems=[problem])
    before.write_text(json.dumps({"cells": [cell]}))
    after.write_text(json.dumps({"cells": [cell]}))
    assert main(["diff", str(before), str(after)]) == 0
    other = {**problem, "message": "adapter_config.json: lora_alpha is 32, expected 16"}
    after.write_text(json.dumps({"cells": [{**cell, "problems": [problem, other]}]}))
    assert main(["diff", str(before), str(after)]) == 1
    after.write_text(json.dumps({"cells": [{**cell, "status": "error", "met": False}]}))
    assert main(["diff", str(before), str(after)]) == 1


def test_coverage_is_shown_on_the_row_and_in_the_page():
    """Which adapted weights the per-module oracles judged: a mark on each row, the counts on -v and in HTML."""
    from compat.report.html import html_report
    from compat.results.skips import coverage_mark, coverage_note

    judged = {"delta at rest": 4, "in flight, Megatron": 3, "in flight, peft": 0}
    unjudged = {"model.layers.0.mlp.router.weight": "no maths for LoRATopKRouter"}
    cov = {"weights": 4, "judged": judged, "unjudged": unjudged, "by_weight": {}}
    cell = {"id": "qwen3_moe.tp1", "status": "pass", "met": True, "metrics": {"coverage": cov}}
    assert coverage_mark(cell) == "3/4" and coverage_mark({"metrics": {}}) == "-"
    note = coverage_note(cell)
    assert note.startswith("judged 3 of 4 adapted weights (delta at rest 4; in flight, Megatron 3; in flight, peft 0)")
    assert "by no oracle: model.layers.0.mlp.router.weight" in note
    page = html_report({"cells": [cell], "versions": {}, "device": "x"}, "results.json")
    assert ">3/4<" in page and "judged 3 of 4" in page


def test_a_results_file_of_either_release_reads_its_expected_patterns() -> None:
    """A record keeps the expectation's patterns as one list, ``expected_matches``; a file written when a record
    also had a one-pattern ``expected_match`` reads the same, in the summaries and as a ``CellResult``."""
    from compat.report.markdown import summary
    from compat.results.record import CellResult, expected_patterns

    new = _cell("llama", status="fail", met=False, reason="other problem", expected_matches=["has no adapter"])
    old = {k: v for k, v in new.items() if k != "expected_matches"} | {"expected_match": "has no adapter"}
    older = {k: v for k, v in new.items() if k != "expected_matches"}  # before expectations had patterns
    assert expected_patterns(new) == expected_patterns(old) == ["has no adapter"] and expected_patterns(older) == []
    assert CellResult.from_dict(old) == CellResult.from_dict(new)
    assert "expected_match" not in {f for f in CellResult.__dataclass_fields__}
    line = "unmet llama.tp1: expected pass matching 'has no adapter', got fail: other problem"
    assert line in "\n".join(summary({"cells": [old]})) and line in "\n".join(summary({"cells": [new]}))
