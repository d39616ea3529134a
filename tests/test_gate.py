"""The gate's pure parts: pin-set validation and the comparison (no environment is built here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compat.gate import GateError, check_complete, compare, load_pins

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
    """Before: results were written after every cell, so an interrupted run left a file whose unrun cells
    counted as dropped, and the gate exited 0."""
    with pytest.raises(GateError, match="stopped before every cell ran"):
        check_complete(results, "results.json")
    check_complete({**results, "complete": True}, "results.json")
