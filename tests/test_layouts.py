"""Layouts: parsing, ids, world size, and refusing what a family cannot be sharded into."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compat.declare.families import get_family
from compat.declare.layouts import Layout, LayoutError, check_fits

sizes = st.integers(min_value=1, max_value=8)


@st.composite
def layouts(draw):
    pp, tp, ep, etp = draw(sizes), draw(sizes), draw(sizes), draw(sizes)
    least = Layout(tp=tp, ep=ep, etp=etp).least_dp
    return Layout(
        tp=tp,
        sp=draw(st.integers(0, 1)) if tp > 1 else 0,
        pp=pp,
        dp=least * draw(st.integers(1, 3)),
        ep=ep,
        etp=etp,
        vpp=draw(sizes) if pp > 1 else 1,
    )


@given(layouts())
def test_cli_and_id_forms_round_trip(layout):
    cli = ",".join(f"{k}={v}" for k, v in layout.as_dict().items() if v != 1 or k == "sp")
    assert Layout.parse(cli) == layout
    assert Layout.parse(layout.slug) == layout
    assert Layout.from_mapping(layout.as_dict()) == layout


@given(layouts())
def test_ids_agree_with_the_reports_slug(layout):
    """Reports recompute ids from results.json's layout tables (report.vocabulary): both must name a layout alike."""
    from compat.report.vocabulary import layout_slug

    assert layout_slug(layout.as_dict()) == layout.slug


@pytest.mark.parametrize(
    ("text", "slug", "world"),
    [("tp=2,sp=1", "tp2-sp", 2), ("tp=2,dp=2", "tp2-dp2", 4), ("pp=2,dp=2", "pp2-dp2", 4), ("dp=2", "dp2", 2),
     ("tp=2,sp=1,ep=2", "tp2-sp-ep2", 2), ("ep=2,dp=2", "ep2", 2), ("ep=2,dp=4", "dp4-ep2", 4),
     ("tp=2,sp=1,dp=2", "tp2-sp-dp2", 4), ("tp2-sp", "tp2-sp", 2)],
)  # fmt: skip
def test_data_and_sequence_parallel_ids_and_world_sizes(text, slug, world):
    layout = Layout.parse(text)
    assert (layout.slug, layout.world_size) == (slug, world)


@pytest.mark.parametrize(
    ("text", "slug"),
    [("tp2-ep2", "tp2-ep2"), ("tp2-sp-ep2", "tp2-sp-ep2"), ("tp1", "tp1"), ("pp2-dp2", "pp2-dp2"),
     ("tp=2,ep=2", "tp2-ep2"), ("TP2-EP2", "tp2-ep2"), ("tp2,ep2", "tp2-ep2"), ("tp=2,sp", "tp2-sp"),
     (" tp=2, ep=2 ", "tp2-ep2"), ("ep2-etp2", "ep2-etp2"), ("pp2-vpp2", "pp2-vpp2")],
)  # fmt: skip
def test_a_layout_is_read_as_cell_ids_write_it_too(text, slug):
    """What a row or a results file shows (``tp2-ep2``) can be pasted back into ``--layout``."""
    assert Layout.parse(text).slug == slug


@pytest.mark.parametrize(
    ("text", "message"),
    [("tq=2", r"'tq' is not a layout key \(did you mean 'tp'\?\)"), ("tp2-eq2", r"did you mean 'ep'\?"),
     ("tp2-ep", r"'ep' has no size"), ("xx=2", r"'xx' is not a layout key; write key=value pairs")],
)  # fmt: skip
def test_a_misread_layout_names_the_part_and_the_nearest_key(text, message):
    with pytest.raises(LayoutError, match=message):
        Layout.parse(text)


@pytest.mark.parametrize(
    ("layout", "world"),
    [("tp1", 1), ("tp=2", 2), ("tp=2,pp=2", 4), ("ep=2", 2), ("tp=2,ep=2", 2), ("ep=2,etp=2", 4), ("tp=2,etp=2", 2),
     ("tp=4,ep=2", 4), ("tp=2,ep=4,pp=2", 8), ("pp=2,vpp=2", 2)],
)  # fmt: skip
def test_world_size_of_known_layouts(layout, world):
    assert Layout.parse(layout).world_size == world


@given(layouts())
def test_world_size_is_the_smallest_data_parallel_fill(layout):
    """Each stage holds whole TP groups and whole EP x ETP groups, and, with dp left out, no smaller world would."""
    per_stage = layout.world_size // layout.pp
    assert layout.world_size % layout.pp == 0 and per_stage == layout.dp * layout.tp
    assert per_stage % layout.tp == 0 and per_stage % (layout.ep * layout.etp) == 0
    least = Layout(tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.etp, vpp=layout.vpp).world_size // layout.pp
    assert not any(n % layout.tp == 0 and n % (layout.ep * layout.etp) == 0 for n in range(1, least))


@pytest.mark.parametrize(
    ("text", "message"),
    [("tp=0", "positive integer"), ("xx=2", "cannot read layout"), ("tp=2,tp=2", "twice"), ("vpp=2", "needs pp > 1"),
     ("sp=1", "sp=1 needs tp > 1"), ("tp=2,sp=2", "'sp' must be 0 or 1"), ("dp=0", "positive integer"),
     ("ep=2,dp=1", r"dp=1 x tp=1 = 1 is not a multiple of ep=2 x etp=1 = 2"), ("tp2-sp2", "'sp' must be 0 or 1")],
)  # fmt: skip
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
