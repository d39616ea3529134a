"""Routing flips (compat/rank/routing.py): near-ties are named and masked, a wrong router is a problem."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from compat.checks.compare import ADAPTER_GROWTH, MIN_POSITIONS, TOLERANCES, compare, positions_problem
from compat.rank.routing import capture_hf_routing, find_flips

B, S, E, K = 2, 6, 8, 2


def _side(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen = torch.zeros_like(logits).scatter_(-1, logits.topk(K, -1).indices, 1.0)
    return {"layer 0 router": logits, "layer 0 routed": chosen, "logits": torch.zeros(B, S, 4)}


def _logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, S, E, generator=g)


def test_no_flip_compares_every_position():
    meg = _logits()
    flips = find_flips(_side(meg), _side(meg + 1e-4), "bf16", 64)
    assert flips is not None and not flips.flips and flips.summary() == "" and bool(flips.keep().all())


def test_a_near_tie_is_named_and_masks_its_sequence_from_that_position():
    meg = _logits()
    meg[1, 3, :] = torch.tensor([3.0, 2.001, 2.0, 0, 0, 0, 0, 0])  # experts 1 and 2 nearly tied for 2nd
    hf = meg.clone()
    hf[1, 3, 2] += 0.002  # a rounding's worth: HF takes expert 2
    flips = find_flips(_side(meg), _side(hf), "bf16", 64)
    assert [(f.layer, f.sequence, f.position) for f in flips.flips] == [(0, 1, 3)]
    assert flips.summary() == "routing flips: 1 tokens at layers 0 (margins <= 1.0e-03, near-ties)"
    assert flips.problems() == []
    keep = flips.keep()
    assert bool(keep[0].all()) and bool(keep[1, :3].all()) and not bool(keep[1, 3:].any())
    meg_logits, hf_logits = torch.zeros(B, S, 4), torch.zeros(B, S, 4)
    hf_logits[1, 4] = 1.0  # what the flip did to a later position
    assert compare(meg_logits, hf_logits, TOLERANCES["bf16"], keep).ok
    assert not compare(meg_logits, hf_logits, TOLERANCES["bf16"]).ok
    hf_logits[0, 5] = 1.0  # an unflipped sequence is still compared
    c = compare(meg_logits, hf_logits, TOLERANCES["bf16"], keep)
    assert not c.ok and c.total == (S + 3) * 4 and c.worst_index == (0, 5, 0)


def test_adapted_forwards_may_drift_adapter_growth_times_further():
    """Where adapters compute on both sides (a merged form against the unmerged adapter) the router noise allowed
    is ADAPTER_GROWTH times the base models', so a bf16 merge's near-tie is a near-tie, not a failure."""
    meg = _logits()
    meg[1, 3, :] = torch.tensor([3.0, 2.099, 2.0, 0, 0, 0, 0, 0])
    hf = meg.clone()
    hf[1, 3, 2] += 0.1  # twice the base noise at this toy size (5e-2), half of ADAPTER_GROWTH times it
    assert "not near-ties" in find_flips(_side(meg), _side(hf), "bf16", 64).problems()[0]
    grown = find_flips(_side(meg), _side(hf), "bf16", 64, growth=ADAPTER_GROWTH)
    assert grown.problems() == [] and grown.summary().endswith(", near-ties)")


def test_a_swapped_router_row_is_not_a_near_tie():
    meg = _logits()
    hf = meg[..., [1, 0, *range(2, E)]]  # the wrong router: every flip lies within twice its own drift
    flips = find_flips(_side(meg), _side(hf), "bf16", 64)
    assert flips.flips and all(f.margin <= 2 * f.drift for f in flips.flips)
    assert "not near-ties" in flips.problems()[0]
    assert "not all near-ties" in flips.summary()


def test_a_flip_at_every_first_position_leaves_nothing_and_says_so():
    meg = _logits()
    meg[:, 0, :] = torch.tensor([3.0, 2.001, 2.0, 0, 0, 0, 0, 0])
    hf = meg.clone()
    hf[:, 0, 2] += 0.002
    flips = find_flips(_side(meg), _side(hf), "bf16", 64)
    assert flips.problems() == []  # near-ties: no router differs
    few = positions_problem(flips.keep(), "adapter")
    assert few and "routing flips left 0 positions past each sequence's first compared" in few


def test_flips_that_leave_fewer_than_the_stated_positions_are_a_problem_and_enough_are_not():
    keep = torch.ones(8, 16, 1, dtype=torch.bool)
    keep[:, 2:] = False  # one position past the first in each of 8 sequences: exactly MIN_POSITIONS
    assert positions_problem(keep, "adapter") is None
    keep[0, 1] = False
    assert f"left {MIN_POSITIONS - 1} positions" in positions_problem(keep, "adapter")


def test_dense_models_have_no_routing():
    assert find_flips({"logits": torch.zeros(1)}, {}, "fp32", 64) is None


class _Router(torch.nn.Module):
    """transformers' Qwen3MoeTopKRouter: 5.3.0 returns the softmax as its first output, 5.8.1 on the logits."""

    def __init__(self, returns_probs: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(E, 16, generator=torch.Generator().manual_seed(1)))
        self.returns_probs = returns_probs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = torch.nn.functional.linear(x, self.weight)
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top, indices = probs.topk(K, -1)
        return (probs if self.returns_probs else logits), top, indices


class _Mlp(torch.nn.Module):
    def __init__(self, returns_probs: bool) -> None:
        super().__init__()
        self.gate = _Router(returns_probs)

    def forward(self, h: torch.Tensor) -> Any:
        return self.gate(h.reshape(-1, h.shape[-1]))


class _Layer(torch.nn.Module):
    def __init__(self, returns_probs: bool) -> None:
        super().__init__()
        self.mlp = _Mlp(returns_probs)


@pytest.mark.parametrize("returns_probs", [False, True], ids=["logits (transformers 5.8.1)", "softmax (5.3.0)"])
def test_hf_router_logits_are_logits_whatever_the_gate_returns(returns_probs: bool):
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([_Layer(returns_probs)])
    x = torch.randn(B, S, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    model.layers[0].mlp.bfloat16()
    store: dict[str, torch.Tensor] = {}
    hooks = capture_hf_routing(model, store, torch.zeros(B, S, dtype=torch.long))
    with torch.no_grad():
        model.layers[0].mlp(x)
    for h in hooks:
        h.remove()
    logits = torch.nn.functional.linear(x, model.layers[0].mlp.gate.weight).float()
    assert torch.equal(store["layer 0 router"], logits)
    assert torch.equal(store["layer 0 routed"], _side(logits)["layer 0 routed"])
    meg = _side(logits.clone())
    meg["layer 0 router"][0, 0] += 1e-3  # a rounding's worth on the Megatron side: no drift beyond noise
    assert all(f.drift <= 2e-3 for f in find_flips(meg, store, "bf16", 16).flips)
