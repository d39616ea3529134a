"""Families, adapters, matrix files and expected outcomes are data, validated on load."""

import tomllib
from pathlib import Path

import pytest

from compat.checks.problems import Problem
from compat.declare.adapters import adapters
from compat.declare.cells import Cell
from compat.declare.expected import Expected, ExpectedError, Tensors, load_expectations
from compat.declare.families import FamilyError, _parse, families
from compat.declare.layouts import Layout
from compat.declare.matrix import MatrixError, load_matrix, parse_matrix

ROOT = Path(__file__).resolve().parents[1]


def test_declared_families_and_adapters_load():
    assert {"llama", "qwen2", "qwen3", "qwen3_moe"} <= set(families())
    assert "lora" in adapters()


def test_family_expert_count_must_agree_with_its_config():
    bad = {"family": {"m": {"model_type": "x", "architecture": "X", "num_experts": 4, "config": {"num_experts": 8}}}}
    with pytest.raises(FamilyError, match="num_experts=4"):
        _parse(bad, "test")


def test_a_family_at_its_own_width_must_declare_its_head_dim():
    """OLMoE-1B-7B widths declared without head_dim inherited [defaults]' 8: HF's OLMoE ignores it, the
    bridge reads it, and the build failed on k_norm's shape instead of the declaration saying so."""
    widths = {"model_type": "olmoe", "architecture": "OlmoeForCausalLM", "config": {"hidden_size": 2048}}
    with pytest.raises(FamilyError, match="would inherit head_dim = 8 from \\[defaults\\]"):
        _parse({"defaults": {"head_dim": 8}, "family": {"w": widths}}, "test")
    widths["config"]["head_dim"] = 128
    assert _parse({"defaults": {"head_dim": 8}, "family": {"w": widths}}, "test")["w"].config["head_dim"] == 128


def test_a_seed_is_declared_data_and_draws_another_base(tmp_path: Path, monkeypatch) -> None:
    """matrix/noise/: the same family at another seed is another draw, cached apart; a bad seed is bad input."""
    import torch
    from safetensors.torch import load_file

    from compat.declare.families import build_tiny_model, tiny_model_dir

    llama = families()["llama"]
    spec = {"model_type": "llama", "architecture": "LlamaForCausalLM", "config": dict(llama.config)}
    parsed = _parse({"family": {"m": spec}, "profile": {"s1": {"families": ["m"], "seed": 1}}}, "test")
    assert (parsed["m"].seed, parsed["m_s1"].seed) == (0, 1)
    # a user file's profile may name the families declared before it (matrix/noise/families.toml: the shipped ones)
    again = _parse({"profile": {"s2": {"families": ["llama"], "seed": 2}}}, "user", families())
    assert set(again) == {"llama_s2"} and again["llama_s2"].seed == 2 and again["llama_s2"].config == llama.config
    with pytest.raises(FamilyError, match="not declared here or before"):
        _parse({"profile": {"s2": {"families": ["llama"], "seed": 2}}}, "user")
    monkeypatch.setenv("COMPAT_CACHE", str(tmp_path / "cache"))
    assert tiny_model_dir(parsed["m"]).name.split("-")[1] != tiny_model_dir(parsed["m_s1"]).name.split("-")[1]
    weights = []
    for name in ("m", "m_s1"):
        build_tiny_model(parsed[name], tmp_path / name)
        weights.append(load_file(tmp_path / name / "model.safetensors")["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(*weights)
    for bad in (-1, "1", True):
        with pytest.raises(FamilyError, match="seed must be a non-negative integer"):
            _parse({"family": {"m": {**spec, "seed": bad}}}, "test")


MATRICES = sorted(p for p in (ROOT / "matrix").glob("*.toml") if p.name != "expected.toml")


def test_every_expectation_speaks_for_a_committed_cell():
    """An entry whose patterns match no cell of any committed matrix is dead data (a renamed cell, a typo)."""
    cells = [c for path in MATRICES for c in load_matrix(path).cells]
    assert cells
    entries = load_expectations(ROOT / "matrix" / "expected.toml").entries
    dead = [e.cells for e in entries if not any(e.matches(c.id, {}, c.spec) or _pattern_only(e, c) for c in cells)]
    assert not dead, f"expectations that match no committed cell: {dead}"


def _pattern_only(entry, cell) -> bool:
    """The entry's patterns and specs match the cell (its version bounds are not what this test is about)."""
    from fnmatch import fnmatchcase

    return cell.spec in entry.specs and any(fnmatchcase(cell.id, p) for p in entry.cells)


def test_cell_ids_follow_the_contract():
    assert Cell.make("llama", Layout(tp=2)).id == "llama.tp2"
    assert Cell.make("llama", Layout(tp=2, pp=2), Layout()).id == "llama.tp2-pp2.to.tp1"
    assert Cell.make("qwen3_moe", Layout(tp=2, ep=2), dtype="bf16").id == "qwen3_moe.tp2-ep2.bf16"
    assert Cell.make("qwen3_moe", Layout(tp=2, ep=2), spec="te").id == "qwen3_moe.tp2-ep2.te"
    assert Cell.make("llama", Layout(tp=2), adapter="canonical", dtype="bf16", spec="te").id == (
        "llama.tp2.canonical.te.bf16"
    )
    assert Cell.make("llama", Layout(tp=2), sync="memory").id == "llama.tp2.memory"
    assert Cell.make("llama", Layout(tp=2), Layout(), dtype="bf16", sync="memory").id == "llama.tp2.to.tp1.bf16.memory"
    assert Cell.make("llama_serving", Layout(), serve=("vllm",), sync="memory").id == "llama_serving.tp1.memory.vllm"
    assert Cell.make("llama", Layout(tp=2), sync="file") == Cell.make("llama", Layout(tp=2))  # file: today's cell


def test_cells_round_trip_through_tasks():
    cell = Cell.make("qwen3_moe", Layout(ep=2), Layout(), "experts", "bf16", "te")
    assert Cell.from_dict(cell.to_dict()) == cell
    memory = Cell.make("llama", Layout(tp=2), sync="memory")
    assert Cell.from_dict(memory.to_dict()) == memory


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("llama", Layout(), None, "lora", "fp32", "tpu"), "unknown layer spec 'tpu'"),
        (("llama", Layout(), None, "lora", "fp16"), "unknown dtype 'fp16'"),
        (("llama", Layout(), None, "per-expert", "fp32", "te"), "configures routed experts"),
        (("qwen3_moe", Layout(), None, "per-expert", "fp32", "local"), "exists only for the te spec"),
        (("llama", Layout(tp=2), None, "r5"), "rank 5, which tp=2 does not divide"),
        (
            ("llama", Layout(), None, "lora", "fp32", "local", (), "ipc"),
            "unknown sync 'ipc'; known syncs: file, memory",
        ),
    ],
)
def test_impossible_cells_are_refused_with_the_reason(args, message):
    from compat.declare.cells import CellError

    with pytest.raises((CellError, ValueError), match=message):
        Cell.make(*args)


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
        ("[[cells]]\nfamilies = ['llama']\nlayouts = ['tp1']\nsync = ['disk']", "unknown sync 'disk'"),
        ("[[cells]]\nfamilies = ['llama']\nlayouts = ['tp1']\nsync = 'memory'", "'sync' must be a non-empty list"),
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
        ("[[expect]]\ncells = 'x'\nstatus = 'fail'\nreason = 'r'\nmatch = '(unclosed'", "not a regular expression"),
        ("[[expect]]\ncells = 'x'\nstatus = 'fail'\nreason = 'r'\nspecs = ['gpu']", "specs"),
        ("[expect]\ncells = 'x'", "write \\[\\[expect\\]\\]"),
        ("[[expect]]\ncells = 'x'\nstatus = 'fail'\nreason = 'r'", "needs a match"),
        ("[[expect]]\ncells = 'x'\nstatus = 'error'\nreason = 'r'\nmatch = []", "needs a match"),
        ("[[expect]]\ncells = 'x'\nstatus = 'fail'\nreason = 'r'\nmatch = [{problem = 'a'}]", "tensors required"),
        (
            "[[expect]]\ncells = 'x'\nstatus = 'fail'\nreason = 'r'\nmatch = {problem = 'a', tensors = '(', count = 2}",
            "not a regular expression",
        ),
        (
            "[[expect]]\ncells = 'x'\nstatus = 'fail'\nreason = 'r'\nmatch = {problem = 'a', tensors = 'b', count = 0}",
            "positive integer",
        ),
    ],
)
def test_malformed_expectations_are_refused(tmp_path, text, message):
    path = tmp_path / "expected.toml"
    path.write_text(text)
    with pytest.raises(ExpectedError, match=message):
        load_expectations(path)


def test_first_matching_expectation_wins_and_versions_and_specs_gate_it(tmp_path):
    path = tmp_path / "expected.toml"
    path.write_text(
        "[[expect]]\ncells = 'qwen3_moe.ep2*'\nspecs = ['local']\nstatus = 'fail'\nreason = 'narrow'\n"
        "when = { megatron-bridge = '<0.7' }\nmatch = 'experts\\\\.\\\\{2,3\\\\}'\n"
        "[[expect]]\ncells = 'qwen3_moe.*'\nstatus = 'error'\nreason = 'broad'\nmatch = 'RuntimeError'\n"
    )
    e = load_expectations(path)
    v6, v7 = {"megatron-bridge": "0.6.2"}, {"megatron-bridge": "0.7.0"}
    assert e.for_cell("qwen3_moe.ep2", v6, "local") == Expected("fail", "narrow", (r"experts\\.\\{2,3\\}",))
    assert e.for_cell("qwen3_moe.ep2", v7, "local").reason == "broad"  # the first entry's versions exclude it
    assert e.for_cell("qwen3_moe.ep2.te", v6, "te").reason == "broad"  # and its specs exclude the te spec
    assert e.for_cell("llama.tp2", v6, "local") == Expected()


def _p(*messages: str) -> list[Problem]:
    return [Problem("files", m) for m in messages]


def test_an_expected_failure_for_another_reason_is_not_met():
    expected = Expected("fail", "experts lost under EP", (r"no adapter for \d+ of the \d+ modules",))
    assert expected.met_by("fail", _p("the export has no adapter for 24 of the 64 modules targeted by [...]"))
    assert not expected.met_by("fail", _p("64 of 64 tensors are not LoRA weight names peft loads"))
    assert not expected.met_by("error", _p("the export has no adapter for 24 of the 64 modules"))
    # an expected failure that names no problem accepts none (before: any): expected.toml refuses one too
    assert not Expected("fail", "any reason").met_by("fail", _p("whatever it says"))


def test_an_expected_failure_with_one_more_problem_is_not_met():
    """Patterns are matched problem by problem: a problem no pattern covers makes the cell unmet, named."""
    expected = Expected("fail", "DoRA magnitudes", (r"use_dora is set but \d+ of \d+ modules",))
    dora = "use_dora is set but 14 of 14 modules carry no lora_magnitude_vector"
    alpha = "adapter_config.json: lora_alpha is 32, expected 16"
    assert expected.met_by("fail", _p(dora))
    assert expected.unmet("fail", _p(dora, alpha)) == [f"not expected: [files] {alpha}"]
    assert expected.unmet("fail", _p(alpha)) == [
        f"not expected: [files] {alpha}",
        f"expected, not seen: {expected.match[0]!r}",
    ]


def test_a_list_of_patterns_must_each_be_seen(tmp_path: Path) -> None:
    path = tmp_path / "expected.toml"
    path.write_text("[[expect]]\ncells = 'x.*'\nstatus = 'fail'\nreason = 'r'\nmatch = ['^a', '^b']\n")
    expected = load_expectations(path).for_cell("x.tp1", {}, "local")
    assert expected.match == ("^a", "^b")
    assert expected.met_by("fail", _p("a1", "b1", "a2"))
    assert not expected.met_by("fail", _p("a1"))
    path.write_text("[[expect]]\ncells = 'x.*'\nstatus = 'fail'\nreason = 'r'\nmatch = ['^a', 3]\n")
    with pytest.raises(ExpectedError, match="a list of them"):
        load_expectations(path)


def test_a_family_the_installed_transformers_lacks_is_unsupported(tmp_path: Path) -> None:
    # Gemma 4 and HY-V3 under transformers 5.3.0 (the bridge-0.4.2 pins): the cell says why, as for
    # an architecture the bridge does not register, rather than erroring in AutoConfig.
    from compat.checks.findings import Unsupported
    from compat.declare.families import Family, build_tiny_model

    family = Family("future", "no_such_model_type", "FutureForCausalLM", "", dict(families()["llama"].config))
    with pytest.raises(Unsupported, match=r"transformers \S+ has no model type 'no_such_model_type'"):
        build_tiny_model(family, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


EP2_LOST = [
    f"model.layers.{i}.mlp.experts.{e}.{m}_proj" for i in range(4) for e in (2, 3) for m in ("gate", "up", "down")
]


def _absent(tensors: list[str]) -> Problem:
    return Problem(
        "files", f"the export has no adapter for {len(tensors)} of the 64 modules, e.g. ...", "", tuple(tensors)
    )


def test_one_more_dropped_expert_is_a_new_problem(tmp_path: Path) -> None:
    """A problem listing tensors is covered only by a pattern naming them: every one, and their count.
    Before: a pattern keyed on the message's "e.g." covered the problem whatever else it listed."""
    path = tmp_path / "expected.toml"
    path.write_text(
        "[[expect]]\ncells = 'qwen3_moe.ep2'\nstatus = 'fail'\nreason = 'r'\nmatch = [\n"
        "  { problem = 'the export has no adapter for', tensors = 'model\\.layers\\.\\d+\\.mlp\\.experts\\.[23]\\."
        "(gate|up|down)_proj', count = 24 },\n]\n"
    )
    expected = load_expectations(path).for_cell("qwen3_moe.ep2", {}, "local")
    assert expected.met_by("fail", [_absent(EP2_LOST)])
    one_more = [*EP2_LOST, "model.layers.0.mlp.experts.1.down_proj"]
    assert expected.unmet("fail", [_absent(one_more)]) == [
        f"not expected: [files] {_absent(one_more).message} (1 of its 25 tensors are not named, e.g. "
        "model.layers.0.mlp.experts.1.down_proj; it lists 25 tensors, expected 24)",
        "expected, not seen: 'the export has no adapter for' (tensors 'model\\\\.layers\\\\.\\\\d+\\\\.mlp\\\\.experts"
        "\\\\.[23]\\\\.(gate|up|down)_proj')",
    ]
    assert not expected.met_by("fail", [_absent(EP2_LOST[:-1])])  # one fewer: the count says so
    # a plain pattern covers no problem that lists tensors, whatever its text says
    plain = Expected("fail", "r", (r"the export has no adapter for \d+ of the \d+ modules",))
    assert plain.unmet("fail", [_absent(EP2_LOST)])[0].endswith("(it lists 24 tensors, the expectation names none)")
    exact = Expected("fail", "r", ("no adapter",), (), (Tensors(tuple(EP2_LOST)),))
    assert exact.met_by("fail", [_absent(EP2_LOST)]) and not exact.met_by("fail", [_absent(one_more)])
