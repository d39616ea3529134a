"""The comparison reports what differed, by how much, where, and against which tolerance."""

import pytest
import torch

from compat.compare import TOLERANCES, compare


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


def test_difference_within_tolerance_passes_and_just_above_fails():
    expected = torch.zeros(3, dtype=torch.float64)
    assert compare(expected + 0.9e-5, expected, TOLERANCES["fp32"]).ok
    assert not compare(expected + 1.1e-5, expected, TOLERANCES["fp32"]).ok


def test_bf16_tolerance_is_looser_than_fp32():
    assert TOLERANCES["bf16"].atol > TOLERANCES["fp32"].atol
