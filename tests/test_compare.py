"""The comparison reports what differed, by how much, where, and against which tolerance."""

import pytest
import torch

from compat.checks.compare import (
    ADAPTER_GROWTH,
    TOLERANCES,
    Tolerance,
    adapter_tolerance,
    compare,
    effect_problem,
)


def test_identical_tensors_match():
    x = torch.randn(2, 16, 32)
    c = compare(x, x.clone(), TOLERANCES["fp32"])
    assert c.ok and c.max_abs_diff == 0


def test_a_planted_difference_is_located_and_measured():
    expected = torch.randn(2, 16, 32)
    actual = expected.clone()
    actual[1, 5, 7] += 0.25
    c = compare(actual, expected, TOLERANCES["fp32"])
    assert not c.ok
    assert c.mismatched == 1 and c.worst_index == (1, 5, 7)
    assert c.max_abs_diff == pytest.approx(0.25, rel=1e-5)
    msg = c.message("logits", ("sequence", "position", "token"))
    assert "1 / 1024" in msg and "sequence 1, position 5, token 7" in msg and "up to 1e-05 allowed" in msg


def test_nan_is_a_mismatch():
    expected = torch.zeros(4)
    actual = expected.clone()
    actual[2] = float("nan")
    assert not compare(actual, expected, TOLERANCES["fp32"]).ok


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_reference_is_a_mismatch_and_is_counted(value):
    """peft's logits and merged weights are the expected side: their NaN must not read as a match."""
    expected = torch.tensor([1.0, value, 1.0, 1.0])
    c = compare(torch.ones(4), expected, Tolerance(1e-5, 0))
    assert not c.ok and c.mismatched == 1 and c.non_finite == 1
    assert "(1 not finite)" in c.message("logits")
    with_rtol = compare(torch.ones(4), expected, Tolerance(5e-2, 5e-2))
    assert not with_rtol.ok


def test_the_adapted_bound_stops_growing_with_a_base_drift_past_the_base_bound():
    """A base conversion fault drifts the bases apart by its own size; the adapted bound counts the
    drift only up to what the base check allows, so it cannot grow with the fault."""
    within = adapter_tolerance("bf16", 0.2, 0.05, base_allowed=0.3)
    assert within.atol == pytest.approx(ADAPTER_GROWTH * 0.2)
    fault = adapter_tolerance("bf16", 3.0, 0.05, base_allowed=0.3)
    assert fault.atol == pytest.approx(ADAPTER_GROWTH * 0.3)


def test_difference_within_tolerance_passes_and_just_above_fails():
    expected = torch.zeros(3, dtype=torch.float64)
    assert compare(expected + 0.9e-5, expected, TOLERANCES["fp32"]).ok
    assert not compare(expected + 1.1e-5, expected, TOLERANCES["fp32"]).ok


def test_rtol_allows_a_share_of_the_expected_value_and_not_more():
    tol = Tolerance(atol=0.0, rtol=0.05)
    expected = torch.tensor([10.0, -4.0, 0.5], dtype=torch.float64)
    assert compare(expected * 1.049, expected, tol).ok
    c = compare(expected * 1.051, expected, tol)
    assert c.mismatched == 3 and c.max_rel_diff == pytest.approx(0.051)
    assert "up to 0.05 allowed" in c.message("x")


def test_atol_and_rtol_add_up():
    tol = TOLERANCES["bf16"]
    expected = torch.tensor([2.0], dtype=torch.float64)
    allowed = tol.atol + tol.rtol * 2.0
    assert compare(expected + 0.99 * allowed, expected, tol).ok
    assert not compare(expected + 1.01 * allowed, expected, tol).ok


@pytest.mark.parametrize("dtype", sorted(TOLERANCES))
def test_an_adapter_effect_within_the_tolerance_proves_nothing(dtype):
    """The floor is the cell's own tolerance: logits without the adapter must fail the comparison."""
    tol = TOLERANCES[dtype]
    base = torch.randn(2, 16, 64, dtype=torch.float64)
    within = base + 0.5 * (tol.atol + tol.rtol * base.abs())
    problem = effect_problem(base, within, tol)
    assert problem is not None and "does not change the logits beyond the tolerance" in problem
    assert f"0 / {base.numel()}" in problem
    beyond = base + 3 * (tol.atol + tol.rtol * base.abs()) + 0.1
    assert effect_problem(base, beyond, tol) is None


def test_noise_bounds_keep_the_toy_table_and_grow_with_size():
    """At the toy's size the table governs; at 28 layers x 151936 logits the modelled drift does."""
    import torch

    from compat.checks.compare import TOLERANCES, adapter_tolerance, base_tolerance, forward_noise

    g = torch.Generator().manual_seed(0)
    toy, big = torch.randn(2, 16, 256, generator=g) * 0.16, torch.randn(2, 16, 151936, generator=g) * 0.9
    for dtype in ("fp32", "bf16"):
        assert base_tolerance(dtype, 4, 64, toy) == TOLERANCES[dtype]
        assert adapter_tolerance(dtype, None) == TOLERANCES[dtype]
    # the measured bf16 drift at Qwen3-1.7B shapes (0.11) lies inside the bound, and within 3x of the model
    assert 0.11 < base_tolerance("bf16", 28, 2048, big).atol < 0.5
    assert 0.11 / 3 < forward_noise("bf16", 28, 2048, big) < 0.11 * 3
    assert base_tolerance("fp32", 28, 2048, big).atol > 1.64e-5
    assert adapter_tolerance("bf16", 0.11, base_allowed=0.5).atol == 0.44
    assert adapter_tolerance("fp32", 1e-7, base_allowed=1e-5) == TOLERANCES["fp32"]
    # a measured maximum below the model does not shrink the bound (matrix/noise/ seed 2: 0.0625 against 0.104)
    assert adapter_tolerance("bf16", 0.0625, 0.104, base_allowed=0.5).atol == 4 * 0.104
    assert adapter_tolerance("bf16", 0.11, 0.104, base_allowed=0.5).atol == 0.44
    with pytest.raises(ValueError, match="the cap"):  # a measured drift is never left uncapped
        adapter_tolerance("bf16", 0.11)


def test_the_bounds_derive_from_the_bases_once_for_every_path():
    """Both paths that compare adapted logits (the file export's peft, the in-memory consumers) take their
    bound from bounds_from_bases: the measured base drift, the model, capped at the base bound."""
    from compat.checks.compare import base_tolerance, bounds_from_bases, forward_noise

    torch.manual_seed(0)
    hf = torch.randn(2, 16, 256)
    close = bounds_from_bases("bf16", 4, 64, hf + 0.01, hf)
    assert close.drift.max_abs_diff == pytest.approx(0.01, rel=1e-3) and close.drift.ok
    assert close.modelled == forward_noise("bf16", 4, 64, hf)
    assert close.adapted == adapter_tolerance(
        "bf16", close.drift.max_abs_diff, close.modelled, base_allowed=close.base.atol
    )
    broken = bounds_from_bases("bf16", 4, 64, hf + 3.0, hf)  # a conversion fault: the bound stops at the base's
    assert not broken.drift.ok
    assert broken.adapted.atol == pytest.approx(ADAPTER_GROWTH * base_tolerance("bf16", 4, 64, hf).atol)
