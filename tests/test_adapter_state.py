"""The adapter fill: equal where the bridge keeps replicas equal, distinct where ranks hold different shards."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state as ps

from compat.rank.adapter_state import fill


class _Grouped(torch.nn.Module):
    """Stands for the bridge's adapter on grouped-GEMM experts, shared by every EP rank (the TE default)."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.shared = shared
        self.linear_in = torch.nn.Parameter(torch.zeros(4, 8))

    def _uses_grouped_expert_sharding(self) -> bool:
        return self.shared


def _model(shared: bool) -> list[torch.nn.Module]:
    experts = torch.nn.Module()
    experts.adapter = _Grouped(shared)
    mlp = torch.nn.Module()
    mlp.experts = experts
    layer = torch.nn.Module()
    layer.mlp = mlp
    return [layer]


def _fill_at(monkeypatch: pytest.MonkeyPatch, ep_rank: int, shared: bool) -> torch.Tensor:
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(ps, "get_expert_model_parallel_rank", lambda: ep_rank)
    monkeypatch.setattr(ps, "get_expert_tensor_parallel_rank", lambda: 0)
    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: 0)
    (values,) = fill(_model(shared), seed=1).values()
    return values


def test_adapter_shared_over_ep_is_equal_on_every_ep_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bridge broadcasts it from EP rank 0 and all-reduces it over EP: a checkpoint holds one copy.
    assert torch.equal(_fill_at(monkeypatch, 0, shared=True), _fill_at(monkeypatch, 1, shared=True))


def test_expert_adapter_differs_per_ep_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    # Experts on different EP ranks are different experts: equal values would hide a dropped gather.
    assert not torch.equal(_fill_at(monkeypatch, 0, shared=False), _fill_at(monkeypatch, 1, shared=False))
