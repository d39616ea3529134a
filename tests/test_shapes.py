"""Shapes as data: ``compat/data/shapes.toml`` validated against the families, and the strategy drawing only
cells that can exist (rules between keys kept, layouts that fit, the family's own value the shrink target)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compat.declare import shapes
from compat.declare.families import get_family
from compat.declare.layouts import check_fits

SPACES, ORDER = shapes.load_spaces()


def _data(**family: object) -> dict:
    return {"names": {"head_dim": "hd", "num_key_value_heads": "kv"}, "family": {"llama": family}}


@pytest.mark.parametrize(
    ("family", "message"),
    [
        ({"intermediate_size": [64]}, "no short name"),
        ({"not_a_key": [1]}, "not a key of the family's config"),
        ({"head_dim": [4.5]}, "non-empty list of positive integers"),
        ({"head_dim": []}, "non-empty list of positive integers"),
    ],
)
def test_bad_declarations_are_refused(family, message):
    data = _data(**family)
    with pytest.raises(shapes.ShapeError, match=message):
        shapes.load_spaces(data, "test.toml")


def test_unknown_family_and_layout_are_refused():
    with pytest.raises(shapes.ShapeError, match="unknown family 'nope'"):
        shapes.load_spaces({"names": {}, "family": {"nope": {}}}, "test.toml")
    with pytest.raises(ValueError, match="cannot read layout"):
        shapes.load_spaces({"layouts": {"order": ["tq=2"]}}, "test.toml")


def test_the_declared_value_comes_first():
    spaces, _ = shapes.load_spaces(_data(head_dim=[4, 8, 16]), "test.toml")
    assert dict(spaces["llama"].keys)["head_dim"] == (8, 4, 16)


def test_names_say_the_changed_keys():
    assert SPACES["llama"].name({}) == "llama"
    assert SPACES["llama"].name({"head_dim": 16, "num_key_value_heads": 1}) == "llama-kv1-hd16"


@pytest.fixture(scope="module")
def drawn_families(tmp_path_factory):
    return shapes.DrawnFamilies(tmp_path_factory.mktemp("shapes") / "families.toml")


@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data())
def test_drawn_cells_can_exist(data, drawn_families):
    strategy = shapes.cells(SPACES, ORDER, drawn_families, ("lora", "r5"), ("fp32", "bf16"), "local", 4)
    drawn = data.draw(strategy)
    family = get_family(drawn.cell.family)
    c = family.config
    assert c["num_attention_heads"] % c["num_key_value_heads"] == 0
    assert c.get("num_experts_per_tok", 0) <= c.get("num_experts", c.get("num_experts_per_tok", 0))
    assert family.num_experts == c.get("num_experts", 0)
    check_fits(drawn.cell.layout, family)
    check_fits(drawn.cell.load_layout, family)
    assert drawn.cell.world_size <= 4 and drawn.cell.layout.world_size <= 4
    assert {k: c[k] for k in drawn.overrides} == drawn.overrides
    assert all(get_family(drawn.base).config[k] != v for k, v in drawn.overrides.items())
    assert drawn.base_id.startswith(drawn.base + ".")


def test_snippet_declares_the_drawn_family(tmp_path):
    import tomllib

    from compat.declare.families import _parse

    text = shapes.family_snippet(
        get_family("qwen3_moe"), "qwen3_moe-e6-k3", {"num_experts": 6, "num_experts_per_tok": 3}
    )
    family = _parse({"family": tomllib.loads(text)["family"]}, "snippet")["qwen3_moe-e6-k3"]
    assert family.num_experts == 6 and family.config["num_experts_per_tok"] == 3
    assert family.config["hidden_size"] == get_family("qwen3_moe").config["hidden_size"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--family", "gemma"], "no shapes declared for gemma"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--dtype", "fp16"], "known dtypes are fp32, bf16"),
    ],
)
def test_fuzz_refuses_bad_input_before_any_rank(argv, message, capsys):
    from compat.cli import main

    assert main(["fuzz", *argv]) == 2
    assert message in capsys.readouterr().err
