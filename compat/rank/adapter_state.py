"""The adapter's values in a rank's model chunks: which parameters they are, filling them, comparing them.

Values are seeded random and non-zero, distinct per tensor, row, expert and shard, so a tensor
saved, gathered or exported into the wrong place cannot agree by accident; equal on the replicas
of a shard, as training keeps them.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

__all__ = [
    "ADAPTER_SCALE",
    "adapter_params",
    "base_params",
    "compare_values",
    "fill",
    "is_adapter",
    "is_expert",
    "snapshot",
]

ADAPTER_SCALE = 0.05


def is_adapter(name: str) -> bool:
    """The bridge's own test for adapter state (``PEFT.adapter_key_filter``)."""
    return ".adapter." in name or name.endswith(".adapters")


def is_expert(name: str) -> bool:
    return ".experts." in name


def adapter_params(model: list) -> dict[str, torch.nn.Parameter]:
    """``"<chunk>/<name>"`` -> parameter, for every adapter parameter of every chunk."""
    return {f"{v}/{n}": p for v, chunk in enumerate(model) for n, p in chunk.named_parameters() if is_adapter(n)}


def base_params(model: list) -> dict[str, torch.nn.Parameter]:
    return {f"{v}/{n}": p for v, chunk in enumerate(model) for n, p in chunk.named_parameters() if not is_adapter(n)}


def snapshot(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Copies on the parameters' own device: a GPU model's base is GBs, a host round trip seconds."""
    return {k: p.detach().clone() for k, p in params.items()}


def _shard(name: str, p: torch.Tensor, ep_replicated: set[int]) -> str:
    """Which shard a tensor is: equal on its replicas, distinct across the ranks that shard it.

    Megatron marks tensor-parallel shards (``tensor_model_parallel``); anything else, such as
    DoRA's magnitude of a row-parallel layer, is replicated over TP and must agree there. Expert
    adapters differ per EP rank (their experts do), except one adapter shared by the grouped-GEMM
    experts of every EP rank (the bridge's default under TE), which the bridge keeps equal there.
    """
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_rank()
    sharded = getattr(p, "tensor_model_parallel", False)
    if is_expert(name):
        etp = ps.get_expert_tensor_parallel_rank() if sharded else 0
        ep = 0 if id(p) in ep_replicated else ps.get_expert_model_parallel_rank()
        return f"pp{pp}-ep{ep}-etp{etp}"
    return f"pp{pp}-tp{ps.get_tensor_model_parallel_rank() if sharded else 0}"


def _ep_replicated(model: list) -> set[int]:
    """Parameters of adapters shared across EP ranks (``ParallelLinearAdapter`` on grouped experts: broadcast
    from EP rank 0 when built and all-reduced over EP in training, megatron/bridge/peft/utils.py:1069-1071)."""
    return {
        id(p)
        for chunk in model
        for m in chunk.modules()
        if callable(getattr(m, "_uses_grouped_expert_sharding", None)) and m._uses_grouped_expert_sharding()
        for p in m.parameters()
    }


def fill(model: list, seed: int) -> dict[str, torch.Tensor]:
    """Write seeded values into every adapter parameter; return a CPU copy of them."""
    values = {}
    replicated = _ep_replicated(model)
    with torch.no_grad():
        for key, p in adapter_params(model).items():
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{_shard(key, p, replicated)}/{key}".encode()))
            p.copy_((torch.randn(p.shape, generator=g) * ADAPTER_SCALE).to(p.dtype))
            values[key] = p.detach().cpu().clone()
    return values


def compare_values(params: dict[str, Any], expected: dict[str, torch.Tensor], what: str) -> list[str]:
    """Every parameter must equal its expected value bit for bit; one problem per tensor that does not."""
    problems = []
    for key, p in params.items():
        got = p.detach()  # compared where it lives: the expected values (host or device) move to it
        if key not in expected:
            problems.append(f"{what} {_name(key)}: not in the reference values")
        elif got.shape != expected[key].shape:
            problems.append(f"{what} {_name(key)}: shape {tuple(got.shape)}, expected {tuple(expected[key].shape)}")
        elif not torch.equal(got, want := expected[key].to(got.device)):
            d = (got.double() - want.double()).abs().max()
            problems.append(f"{what} {_name(key)}: max |diff| {d:.3e}, expected bit-exact")
    return problems


def _name(key: str) -> str:
    chunk, name = key.split("/", 1)
    return f"{name} (chunk {chunk})"
