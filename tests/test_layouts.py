"""Layouts: parsing, ids, world size, and refusing what a family cannot be sharded into."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compat.families import get_family
from compat.layouts import Layout, LayoutError, check_fits

sizes = st.integers(min_value=1, max_value=8)


@st.composite
def layouts(draw):
    pp = draw(sizes)
    return Layout(tp=draw(sizes), pp=pp, ep=draw(sizes), etp=draw(sizes), vpp=draw(sizes) if pp > 1 else 1)


@given(layouts())
def test_cli_and_id_forms_round_trip(layout):
    cli = ",".join(f"{k}={v}" for k, v in layout.as_dict().items() if v != 1)
    assert Layout.parse(cli) == layout
    assert Layout.parse(layout.slug) == layout


@pytest.mark.parametrize(
    ("layout", "world"),
    [("tp1", 1), ("tp=2", 2), ("tp=2,pp=2", 4), ("ep=2", 2), ("tp=2,ep=2", 2), ("ep=2,etp=2", 4), ("tp=2,etp=2", 2),
     ("tp=4,ep=2", 4), ("tp=2,ep=4,pp=2", 8), ("pp=2,vpp=2", 2)],
)  # fmt: skip
def test_world_size_of_known_layouts(layout, world):
    assert Layout.parse(layout).world_size == world


@given(layouts())
def test_world_size_is_the_smallest_data_parallel_fill(layout):
    """Each stage holds whole TP groups and whole EP x ETP groups, and no smaller world would."""
    per_stage = layout.world_size // layout.pp
    assert layout.world_size % layout.pp == 0
    assert per_stage % layout.tp == 0 and per_stage % (layout.ep * layout.etp) == 0
    assert not any(n % layout.tp == 0 and n % (layout.ep * layout.etp) == 0 for n in range(1, per_stage))


@pytest.mark.parametrize(
    ("text", "message"),
    [("tp=0", "positive integer"), ("xx=2", "cannot read layout"), ("tp=2,tp=2", "twice"), ("vpp=2", "needs pp > 1")],
)
def test_malformed_layouts_are_refused(text, message):
    with pytest.raises(LayoutError, match=message):
        Layout.parse(text)


@pytest.mark.parametrize(
    ("family", "layout", "message"),
    [
        ("llama", "tp=3", "tp=3 does not divide 8 attention heads"),
        ("llama", "tp=8", "tp=8 does not divide 4 KV heads"),
        ("llama", "pp=3", "pp=3 = 3 stages do not divide 4 layers"),
        ("llama", "pp=2,vpp=4", "pp=2 x vpp=4 = 8 stages do not divide 4 layers"),
        ("llama", "ep=2", "has no experts"),
        ("qwen3_moe", "ep=3", "ep=3 does not divide 4 experts"),
    ],
)
def test_layouts_a_family_cannot_take_name_the_constraint(family, layout, message):
    with pytest.raises(LayoutError, match=message):
        check_fits(Layout.parse(layout), get_family(family))


@pytest.mark.parametrize("layout", ["tp=4", "pp=4", "ep=4", "pp=2,vpp=2", "tp=2,ep=2", "ep=2,etp=2"])
def test_contract_sizes_allow_the_contract_layouts(layout):
    check_fits(Layout.parse(layout), get_family("qwen3_moe"))
