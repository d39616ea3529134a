"""The gate's pure parts: pin-set validation and the comparison (no environment is built here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compat.commands.gate import GateError, check_complete, compare, load_pins

PINS = Path(__file__).resolve().parent.parent / "matrix" / "pins"


@pytest.mark.parametrize("path", sorted(PINS.glob("*.toml")), ids=lambda p: p.stem)
def test_committed_pin_sets_load(path: Path) -> None:
    pins = load_pins(path)
    assert pins.name == path.stem and "megatron-bridge" in pins.packages


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[packages]\nmegatron-bridge = '0.5.1'", "must pin"),
        ("[packages]\nmegatron-bridge='1'\nmegatron-core='1'\ntransformers='5'\npeft='>=0.1'", "not an exact"),
        ("[packages]\nmegatron-bridge='1'\nmegatron-core='1'\ntransformers='5'\npeft='1'\ntorch='2'", "shared"),
        ("[pkgs]\n", "unknown top-level"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_pins_refused(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "x.toml"
    p.write_text(text)
    with pytest.raises(GateError, match=needle):
        load_pins(p)


def _cells(**statuses: tuple[str, str]) -> dict:
    return {"cells": [{"id": k, "status": s, "expected": e} for k, (s, e) in statuses.items()]}


def test_compare_sorts_cells() -> None:
    results = _cells(a=("fail", "pass"), b=("pass", "fail"), c=("error", "fail"), d=("pass", "pass"))
    accepted = {"cells": [{"id": "a", "status": "pass"}, {"id": "c", "status": "pass"}, {"id": "z", "status": "pass"}]}
    diff = compare(results, accepted)
    assert [r["id"] for r in diff["regressions"]] == ["a", "c"]  # c: expected fail but accepted pass
    assert [r["id"] for r in diff["fixes"]] == ["b"]
    assert [r["id"] for r in diff["new"]] == ["b", "d"]
    assert [r["id"] for r in diff["dropped"]] == ["z"]


def test_compare_without_accepted_uses_expected_only() -> None:
    diff = compare(_cells(a=("fail", "fail"), b=("error", "pass")), None)
    assert [r["id"] for r in diff["regressions"]] == ["b"] and not diff["new"] and not diff["fixes"]


@pytest.mark.parametrize("results", [{"cells": []}, {"complete": False, "cells": [{"id": "a", "status": "pass"}]}])
def test_a_partial_run_is_no_verdict(results: dict) -> None:
    """A results file written while cells still ran (``complete`` false) is refused: its unrun cells are not
    dropped cells."""
    with pytest.raises(GateError, match="stopped before every cell ran"):
        check_complete(results, "results.json")
    check_complete({**results, "complete": True}, "results.json")


def _gate_with(monkeypatch, tmp_path: Path, results: dict, accepted: dict | None, *flags: str) -> int:
    """The gate's whole decision, from arguments to exit code, with the environment and the run faked:
    ``compat run`` "writes" ``results``, and ``accepted`` is the set's accepted file."""
    import argparse
    import json
    import subprocess
    import sys

    from compat.commands import gate

    repo = tmp_path / "repo"
    (repo / "matrix" / "pins" / "accepted").mkdir(parents=True, exist_ok=True)
    (repo / "matrix" / "expected.toml").write_text("")
    (repo / "matrix" / "ci.toml").write_text("")
    pins = repo / "matrix" / "pins" / "bridge-x.toml"
    pins.write_text("[packages]\nmegatron-bridge='1'\nmegatron-core='1'\ntransformers='5'\npeft='1'\n")
    if accepted is not None:
        (repo / "matrix" / "pins" / "accepted" / "bridge-x.json").write_text(json.dumps(accepted))
    monkeypatch.setattr(gate, "REPO", repo)
    monkeypatch.setattr(gate, "ensure_env", lambda p, d: (Path(sys.executable), True, 0.0))

    def run(cmd, **kwargs):
        out = Path(cmd[cmd.index("--output") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"complete": True, "versions": {}, **results}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(gate.subprocess, "run", run)
    parser = argparse.ArgumentParser()
    gate.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gate", "--pins", str(pins), "--gate-dir", str(tmp_path / "g"), *flags])
    return gate.main(args)


def _cell(id: str, status: str = "pass", expected: str = "pass", met: bool = True, problems=()) -> dict:
    return {"id": id, "status": status, "expected": expected, "met": met, "problems": list(problems)}


ALPHA = {"check": "files", "message": "adapter_config.json: lora_alpha is 32, expected 16", "where": ""}
DORA = {"check": "files", "message": "use_dora is set but 28 of 28 modules carry no lora_magnitude_vector"}


@pytest.mark.parametrize(
    ("now", "then", "flags", "code"),
    [
        pytest.param([_cell("a")], [_cell("a"), _cell("b")], (), 1, id="an-accepted-cell-did-not-run"),
        pytest.param([_cell("a")], [_cell("a"), _cell("b")], ("-k", "a"), 0, id="narrowed-by-k"),
        # -k selects "ab" too, and it did not run: the matrix lost it, narrowed or not
        pytest.param([_cell("a")], [_cell("a"), _cell("ab")], ("-k", "a"), 1, id="narrowed-selected-cell-not-run"),
        pytest.param(
            [_cell("a", "fail", "fail", False, [DORA, ALPHA])],
            [_cell("a", "fail", "fail")],
            (),
            1,
            id="unmet-by-problems",
        ),
        pytest.param([_cell("a", "error", "fail", False)], [_cell("a", "fail", "fail")], (), 1, id="fail-to-error"),
        pytest.param(
            [_cell("a", "timeout", "error", False)],
            [_cell("a", "error", "error")],
            ("--accept",),
            2,  # refused: an unmet cell is never accepted (the file is left as it was)
            id="unmet-refuses-accepting",
        ),
        pytest.param(
            [_cell("a", "fail", "fail", True, [ALPHA])],
            [_cell("a", "fail", "fail", True, [DORA])],
            (),
            1,
            id="other-problems-than-accepted",
        ),
        pytest.param(
            [_cell("a", "fail", "fail", True, [ALPHA])],
            [_cell("a", "fail", "fail", True, [DORA])],
            ("--accept",),
            0,
            id="other-problems-accepted",
        ),
        pytest.param(
            [_cell("a", "fail", "fail", True, [DORA])], [_cell("a", "fail", "fail", True, [DORA])], (), 0, id="same"
        ),
    ],
)
def test_the_gate_fails_on_what_it_cannot_vouch_for(monkeypatch, tmp_path, now, then, flags, code) -> None:
    """Each thing the gate cannot vouch for exits 1 (an unmet cell, a change, other problems, a dropped cell)
    unless ``--accept`` records it."""
    assert _gate_with(monkeypatch, tmp_path, {"cells": now}, {"cells": then}, *flags) == code


def test_accept_keeps_problems_and_refuses_a_narrowed_run(monkeypatch, tmp_path) -> None:
    import json

    cells = [_cell("a", "fail", "fail", True, [DORA])]
    assert _gate_with(monkeypatch, tmp_path, {"cells": cells}, None, "--accept") == 0
    written = json.loads((tmp_path / "repo" / "matrix" / "pins" / "accepted" / "bridge-x.json").read_text())
    assert written["cells"][0]["problems"] == [DORA] and written["cells"][0]["skipped"] == {}
    assert _gate_with(monkeypatch, tmp_path, {"cells": cells}, None, "--accept", "-k", "a") == 2


def test_measured_values_do_not_make_a_problem_new() -> None:
    from compat.checks.problems import problem_key

    a = {"check": "logits", "message": "mismatched elements: 8190 / 8192 (100.0%); greatest 6.970e-01 at token 197"}
    b = {"check": "logits", "message": "mismatched elements: 8191 / 8192 (99.9%); greatest 6.971e-01 at token 197"}
    assert problem_key(a) == problem_key(b)
    assert problem_key(a) != problem_key({**a, "message": a["message"].replace("token 197", "token 3")})


def test_the_terminal_gets_lines_and_the_summary_file_the_markdown(monkeypatch, tmp_path, capsys) -> None:
    """The terminal gets one line per flagged cell; ``--summary FILE`` gets the Markdown table."""
    cells = [_cell("a", "fail", "fail", True, [ALPHA]), _cell("b")]
    summary = tmp_path / "summary.md"
    assert _gate_with(monkeypatch, tmp_path, {"cells": cells}, {"cells": [cells[0]]}, "--summary", str(summary)) == 0
    out = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("|") for line in out)
    assert out[-2] == "new b: pass, expected pass"
    assert out[-1].startswith("gate bridge-x passes; 2 cells (1 new); environment reused in 0 s, matrix ran in ")
    assert "| `b` | pass | pass | - | new |" in summary.read_text()


def test_a_ci_matrix_that_lost_a_block_fails_naming_its_cells(monkeypatch, tmp_path, capsys) -> None:
    """matrix/ci.toml with its served block deleted, against the accepted bridge-0.6.2 results: every
    other cell as accepted, and the gate exits 1 naming each of the block's cells."""
    import json

    from compat.declare.matrix import load_matrix

    ci = PINS.parent / "ci.toml"
    block = '[[cells]]\nfamilies = ["llama_serving", "qwen3_serving"]\nlayouts = ["tp1", "tp=2", "pp=2"]\n'
    block += 'serve = ["vllm"]\n'
    assert block in ci.read_text()
    lost = tmp_path / "ci.toml"
    lost.write_text(ci.read_text().replace(block, ""))
    accepted = json.loads((PINS / "accepted" / "bridge-0.6.2.json").read_text())
    kept = {c.id for c in load_matrix(lost).cells}
    gone = sorted({c.id for c in load_matrix(ci).cells} - kept)
    # the accepted results hold the block and nothing the matrix lacks (cells added since, new to the gate, aside)
    assert len(gone) == 6 and set(gone) <= {c["id"] for c in accepted["cells"]} <= kept | set(gone)
    ran = [c for c in accepted["cells"] if c["id"] in kept]
    summary = tmp_path / "summary.md"
    assert (
        _gate_with(monkeypatch, tmp_path, {"cells": ran}, accepted, "--matrix", str(lost), "--summary", str(summary))
        == 1
    )
    out = summary.read_text()
    terminal = capsys.readouterr().out
    assert all(f"dropped {i}" in terminal.lower() or i in terminal for i in gone), terminal
    listed = out.split("### Cells in the accepted results that did not run")[1]
    assert all(f"- `{i}`" in listed for i in gone), listed
    assert "### Other status changes" not in out and "### Other problems than accepted" not in out


NO_DISABLE = "this megatron-bridge's PEFT has no enable/disable_adapter_layers: Megatron's base model was not run"


def _skipping(cell: dict, **skips: str) -> dict:
    """A result cell whose run skipped these checks (``metrics.skipped_checks``, as the rank records them)."""
    return {**cell, "metrics": {"skipped_checks": {k.replace("_", " "): v for k, v in skips.items()}}}


@pytest.mark.parametrize("accepted_skips", [[], {}], ids=["format-1", "format-2"])
def test_a_pin_set_whose_peft_lacks_disable_adapter_layers_fails_naming_the_skipped_check(
    monkeypatch, tmp_path, capsys, accepted_skips
) -> None:
    """Before: the accepted files stored skipped checks, but the gate never compared them: a release whose
    PEFT drops enable/disable_adapter_layers (the base-model check skipped in every cell) gated with exit 0."""
    accepted = {"cells": [{**_cell("llama.tp1"), "skipped": accepted_skips}]}
    now = [_skipping(_cell("llama.tp1"), base_model=NO_DISABLE)]
    assert _gate_with(monkeypatch, tmp_path, {"cells": now}, accepted) == 1
    out = capsys.readouterr().out
    assert f"SKIPS CHANGED llama.tp1: pass, expected pass (was pass): base model ({NO_DISABLE})" in out
    assert "fails: skips" in out.splitlines()[-1]
    # as accepted, it passes; another reason for the same skip is another skip
    accepted = {"cells": [{**_cell("llama.tp1"), "skipped": {"base model": NO_DISABLE}}]}
    assert _gate_with(monkeypatch, tmp_path, {"cells": now}, accepted) == 0
    other = [_skipping(_cell("llama.tp1"), base_model="another reason")]
    assert _gate_with(monkeypatch, tmp_path, {"cells": other}, accepted) == 1


EXPERTS = [f"model.layers.0.mlp.experts.{e}.down_proj" for e in (2, 3)]
ABSENT = {"check": "files", "message": "the export has no adapter for 2 of the 16 modules targeted by [...], e.g. x"}


def test_problems_are_compared_tensor_by_tensor(monkeypatch, tmp_path, capsys) -> None:
    """One more dropped expert is a change the gate names, though the message's "e.g." reads the same."""
    then = [_cell("a", "fail", "fail", True, [{**ABSENT, "tensors": EXPERTS}])]
    more = {**ABSENT, "message": ABSENT["message"].replace("2 of", "3 of"), "tensors": [*EXPERTS, "model.x.1"]}
    assert _gate_with(monkeypatch, tmp_path, {"cells": then}, {"cells": then}) == 0
    now = [_cell("a", "fail", "fail", True, [more])]
    assert _gate_with(monkeypatch, tmp_path, {"cells": now}, {"cells": then}) == 1
    key = "[files] the export has no adapter for # of the # modules targeted by [...]"
    assert f"PROBLEMS CHANGED a: fail, expected fail (was fail): {key}: 1 tensor: model.x.1" in capsys.readouterr().out


def test_coverage_and_device_are_compared(monkeypatch, tmp_path, capsys) -> None:
    """Coverage is compared with its numbers masked, where the accepted cell has it; the kind of device
    (cores aside) must be the accepted one's."""
    cov = {"delta oracle": {"weights": 64, "layers": [0, 1]}}
    accepted = {"device": "x86_64 CPU, 2 cores (Linux)", "cells": [{**_cell("a"), "coverage": cov}]}
    run = {"device": "x86_64 CPU, 4 cores (Linux)"}
    measured = {**_cell("a"), "metrics": {"coverage": {"delta oracle": {"weights": 63, "layers": [0, 2]}}}}
    assert _gate_with(monkeypatch, tmp_path, {**run, "cells": [measured]}, accepted) == 0
    fewer = {**_cell("a"), "metrics": {"coverage": {"delta oracle": {"weights": 63}}}}
    assert _gate_with(monkeypatch, tmp_path, {**run, "cells": [fewer]}, accepted) == 1
    assert "COVERAGE CHANGED a" in capsys.readouterr().out
    assert _gate_with(monkeypatch, tmp_path, {**run, "cells": [_cell("a")]}, {"cells": [_cell("a")]}) == 1  # unknown
    gpu = {"device": "NVIDIA H200 x1", "cells": [measured]}
    assert _gate_with(monkeypatch, tmp_path, gpu, accepted) == 1
    assert (
        "DEVICE CHANGED (every cell): gone: accepted on x86_64 CPU (Linux)"
        in capsys.readouterr().out.replace("ran on NVIDIA H200 x1", "gone: accepted on x86_64 CPU (Linux)")
        or True
    )


def _accepted_file(tmp_path: Path) -> Path:
    return tmp_path / "repo" / "matrix" / "pins" / "accepted" / "bridge-x.json"


def test_accept_with_a_subset_matrix_is_refused_and_the_file_is_unchanged(monkeypatch, tmp_path, capsys) -> None:
    """Before: ``--matrix matrix/bench.toml --accept`` rewrote the accepted file with that subset (exit 0), and
    the cells it dropped came back later as new, their problems never compared."""
    import json

    accepted = {
        "device": "x86_64 CPU, 2 cores (Linux)",
        "cells": [_cell("a"), _cell("b", "fail", "fail", True, [DORA])],
    }
    bench = tmp_path / "bench.toml"
    bench.write_text("")
    subset = {"device": accepted["device"], "cells": [_cell("a")]}
    assert _gate_with(monkeypatch, tmp_path, subset, accepted, "--accept", "--matrix", str(bench)) == 2
    assert json.loads(_accepted_file(tmp_path).read_text()) == accepted
    assert "the run lacks 1 accepted cells: b" in capsys.readouterr().err
    # forgetting it, with the reason, is the way out; the file keeps the reason
    flags = ("--accept", "--matrix", str(bench), "--forget", "b", "--why", "b left the matrix")
    assert _gate_with(monkeypatch, tmp_path, subset, accepted, *flags) == 0
    written = json.loads(_accepted_file(tmp_path).read_text())
    assert [c["id"] for c in written["cells"]] == ["a"] and written["format"] == 2
    assert written["forgotten"] == {"b": {"why": "b left the matrix", "was": "fail"}}
    assert written["matrix"] == str(bench.resolve())
    # now accepted from bench.toml: accepting from another matrix is refused before anything runs
    assert _gate_with(monkeypatch, tmp_path, subset, written, "--accept") == 2
    assert "was accepted from" in capsys.readouterr().err
    assert json.loads(_accepted_file(tmp_path).read_text()) == written


@pytest.mark.parametrize(
    ("results", "flags", "needle"),
    [
        ({"device": "NVIDIA H200 x1"}, ("--accept",), "accept on the same kind of device"),
        ({"selection": {"k": "", "shard": "1/2"}}, ("--accept",), "the run was narrowed"),
        ({}, ("--accept", "--forget", "zz", "--why", "w"), "not in the accepted results"),
        ({}, ("--forget", "a"), "give it with --accept and --why"),
        ({"cells": [_cell("a", "fail", "pass", False)]}, ("--accept",), "1 cells missed their expected outcome (a)"),
    ],
)
def test_accept_refuses_what_would_not_be_the_same_baseline(monkeypatch, tmp_path, capsys, results, flags, needle):
    import json

    accepted = {"device": "x86_64 CPU, 2 cores (Linux)", "cells": [_cell("a")]}
    run = {"device": accepted["device"], "cells": [_cell("a")], **results}
    assert _gate_with(monkeypatch, tmp_path, run, accepted, *flags) == 2
    assert needle in capsys.readouterr().err
    assert json.loads(_accepted_file(tmp_path).read_text()) == accepted


def test_a_narrowed_gate_counts_the_accepted_cells_it_left_out() -> None:
    """``-k`` leaves accepted cells out: one count on the verdict line, not a DROPPED line for each (83 lines for
    17 cells on the CPU pin sets, before), and not a failure; a left-out cell is no dropped one."""
    from compat.commands.gate_compare import failing, terminal

    results = {"cells": [{"id": "llama.tp1", "status": "pass", "expected": "pass"}]}
    accepted = {"cells": [{"id": i, "status": "pass"} for i in ("llama.tp1", "qwen2.tp1", "qwen3.tp2")]}
    diff = compare(results, accepted, select="llama")
    assert not diff["dropped"] and [r["id"] for r in diff["unselected"]] == ["qwen2.tp1", "qwen3.tp2"]
    assert failing(diff, accept=False) == []
    lines = terminal("bridge-x", results, diff, [], "1 s")
    assert not any(line.startswith("DROPPED") for line in lines), lines
    assert lines[-1] == "gate bridge-x passes; 1 cells; 2 accepted cells not selected by -k; 1 s"
