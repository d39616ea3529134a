"""Routing replay (compat/rank/route_replay.py): the HF side computes with the experts it is given and
weighs them itself; only near-ties that leave too few positions are replayed, never a router that differs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from compat.rank.route_replay import Unreplayable, pair_routing, replay_forward
from compat.rank.routing import hf_forward

B, S, E, K = 2, 8, 16, 4


@pytest.fixture(scope="module")
def model() -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(1))


def test_replaying_a_models_own_routing_changes_nothing(model, ids):
    with torch.no_grad():
        own = hf_forward(model, ids)
    again = replay_forward(model, ids, own)
    assert torch.equal(again["logits"], own["logits"])
    assert all(torch.equal(again[f"layer {n} routed"], own[f"layer {n} routed"]) for n in (0, 1))


def test_the_given_experts_are_used_and_weighed_by_the_gate(model, ids):
    with torch.no_grad():
        own = hf_forward(model, ids)
    given = {k: v.clone() for k, v in own.items()}
    row = given["layer 0 routed"][0, 3]
    out, into = int(row.nonzero()[0]), int((row == 0).nonzero()[0])
    row[out], row[into] = 0.0, 1.0  # sequence 0, position 3: one expert for another
    again = replay_forward(model, ids, given)
    assert torch.equal(again["layer 0 routed"], given["layer 0 routed"])
    assert torch.equal(again["logits"][1], own["logits"][1])  # the other sequence computes as before
    assert torch.equal(again["logits"][0, :3], own["logits"][0, :3])  # and this one before the swap
    assert not torch.equal(again["logits"][0, 3], own["logits"][0, 3])


def test_a_gate_whose_weights_are_no_softmax_top_k_is_not_replayed(model, ids, monkeypatch):
    gate = model.model.layers[0].mlp.gate
    forward = type(gate).forward

    def doubled(self: Any, x: torch.Tensor) -> Any:
        logits, weights, idx = forward(self, x)
        return logits, weights * 2, idx

    monkeypatch.setattr(type(gate), "forward", doubled)
    with torch.no_grad():
        own = hf_forward(model, ids)
    with pytest.raises(Unreplayable, match="layer 0: the gate's weights are no softmax top-k"):
        replay_forward(model, ids, own)


def _side(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen = torch.zeros_like(logits).scatter_(-1, logits.topk(K, -1).indices, 1.0)
    return {"layer 0 router": logits, "layer 0 routed": chosen, "logits": torch.zeros(B, S, 4)}


def _flipped_at_every_second_position(gap: float) -> tuple[dict, dict]:
    """Two sides whose 4th and 5th experts swap at position 1 of each sequence, ``gap`` apart in logits."""
    meg = torch.randn(B, S, E, generator=torch.Generator().manual_seed(2))
    meg[:, 1, :] = torch.tensor([5.0, 4.0, 3.0, 2.0 + gap, 2.0] + [0.0] * (E - 5))
    hf = meg.clone()
    hf[:, 1, 4] += 2 * gap  # HF takes expert 4: a near-tie when gap is a rounding's worth
    return _side(meg), _side(hf)


def test_near_ties_that_leave_too_few_positions_are_replayed_and_every_position_compared():
    meg, hf = _flipped_at_every_second_position(1e-3)
    replayed = {**meg, "logits": torch.ones(B, S, 4)}
    metrics: dict[str, Any] = {}
    p = pair_routing(meg, hf, "adapter", "bf16", 64, metrics, lambda: (meg, replayed))
    assert p.keep is None and p.problems == () and p.second is replayed
    assert (
        metrics["routing"]["adapter"]["replay"].startswith("replayed")
        and metrics["routing"]["adapter"]["positions_compared"] == B * S
    )


def test_without_a_replay_or_when_it_does_not_help_the_flips_stand():
    meg, hf = _flipped_at_every_second_position(1e-3)
    p = pair_routing(meg, hf, "adapter", "bf16", 64, {})
    assert p.keep is not None and "routing flips left" in p.problems[-1]
    metrics: dict[str, Any] = {}
    p = pair_routing(meg, hf, "adapter", "bf16", 64, metrics, lambda: (meg, hf))  # still routed otherwise
    assert p.keep is not None and metrics["routing"]["adapter"]["replay"].startswith("not replayed: ")

    def refused() -> Any:
        raise Unreplayable("no MoE gate returns its chosen experts")

    metrics = {}
    p = pair_routing(meg, hf, "adapter", "bf16", 64, metrics, refused)
    assert p.keep is not None and metrics["routing"]["adapter"]["replay"] == (
        "not replayed: no MoE gate returns its chosen experts"
    )


def test_a_router_that_differs_is_never_replayed():
    meg, hf = _flipped_at_every_second_position(1.0)  # a whole logit apart: no rounding does that
    called: list[bool] = []
    p = pair_routing(meg, hf, "adapter", "bf16", 64, {}, lambda: called.append(True) or (meg, meg))
    assert not called and any("not near-ties" in q for q in p.problems)
