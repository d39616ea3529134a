"""Families, adapters, matrix files and expected outcomes are data, validated on load."""

import tomllib
from pathlib import Path

import pytest

from compat.adapters import adapters
from compat.cells import Cell
from compat.expected import ExpectedError, load_expectations
from compat.families import FamilyError, _parse, families
from compat.layouts import Layout
from compat.matrix import MatrixError, load_matrix, parse_matrix

ROOT = Path(__file__).resolve().parents[1]


def test_declared_families_and_adapters_load():
    assert {"llama", "qwen2", "qwen3", "qwen3_moe"} <= set(families())
    assert "lora" in adapters()


def test_family_expert_count_must_agree_with_its_config():
    bad = {"family": {"m": {"model_type": "x", "architecture": "X", "num_experts": 4, "config": {"num_experts": 8}}}}
    with pytest.raises(FamilyError, match="num_experts=4"):
        _parse(bad, "test")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "matrix").glob("*.toml") if p.name != "expected.toml"))
def test_committed_matrix_files_are_valid(name):
    matrix = load_matrix(ROOT / "matrix" / name)
    assert matrix.cells
    assert len({c.id for c in matrix.cells}) == len(matrix.cells)


def test_committed_expectations_are_valid():
    assert load_expectations(ROOT / "matrix" / "expected.toml").entries


def test_cell_ids_follow_the_contract():
    assert Cell.make("llama", Layout(tp=2)).id == "llama.tp2"
    assert Cell.make("llama", Layout(tp=2, pp=2), Layout()).id == "llama.tp2-pp2.to.tp1"
    assert Cell.make("qwen3_moe", Layout(tp=2, ep=2), dtype="bf16").id == "qwen3_moe.tp2-ep2.bf16"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cells = 3", "no \\[\\[cells\\]\\] blocks"),
        ("[[cells]]\nfamilies = ['llama']", "missing 'layouts'"),
        ("[[cells]]\nfamilies = ['llama']\nlayouts = ['tp=3']", "tp=3 does not divide"),
        ("[[cells]]\nfamilies = ['mamba']\nlayouts = ['tp1']", "unknown family 'mamba'"),
        ("[[cells]]\nfamilies = ['llama']\nlayouts = ['tp1', 'tp=1']", "listed twice"),
        ("[[cells]]\nfamilies = ['llama']\nlayouts = ['tp1']\nlayout = ['tp=2']", "unknown keys \\['layout'\\]"),
        ("timeout = -1\n[[cells]]\nfamilies = ['llama']\nlayouts = ['tp1']", "timeout must be"),
    ],
)
def test_malformed_matrices_are_refused_with_the_reason(text, message):
    with pytest.raises(MatrixError, match=message):
        parse_matrix(tomllib.loads(text), "m.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[expect]]\ncells = 'llama.*'\nstatus = 'broken'", "not one of"),
        ("[[expect]]\ncells = 'llama.*'\nstatus = 'fail'", "needs a reason"),
        ("[[expect]]\ncells = 'x'\nstatus = 'fail'\nreason = 'r'\nwhen = {megatron-bridge = 'abc'}", "not a version"),
        ("[[expect]]\ncells = 'x'\nstatus = 'fail'\nreason = 'r'\nwhen = {numpy = '>1'}", "names 'numpy'"),
        ("[expect]\ncells = 'x'", "write \\[\\[expect\\]\\]"),
    ],
)
def test_malformed_expectations_are_refused(tmp_path, text, message):
    path = tmp_path / "expected.toml"
    path.write_text(text)
    with pytest.raises(ExpectedError, match=message):
        load_expectations(path)


def test_first_matching_expectation_wins_and_versions_gate_it(tmp_path):
    path = tmp_path / "expected.toml"
    path.write_text(
        "[[expect]]\ncells = 'qwen3_moe.ep2'\nstatus = 'fail'\nreason = 'bridge bug'\n"
        "when = { megatron-bridge = '<0.7' }\n"
    )
    e = load_expectations(path)
    assert e.status_for("qwen3_moe.ep2", {"megatron-bridge": "0.6.2"}) == ("fail", "bridge bug")
    assert e.status_for("qwen3_moe.ep2", {"megatron-bridge": "0.7.0"}) == ("pass", "")
    assert e.status_for("llama.tp2", {"megatron-bridge": "0.6.2"}) == ("pass", "")
