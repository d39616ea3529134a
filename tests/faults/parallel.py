"""Faults only data or sequence parallelism can show, planted where each would really happen.

Like ``tamper.py``, everything here runs inside a rank, with torch and megatron imported inside
the functions; ``catalogue.py`` names which fault uses which wrapper.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

__all__ = ["dp_rank1_writes_own_copy", "exchange_corrupts_received", "sp_gather_drops_last_chunk"]


def _first_adapter_shard(sharded_state_dict: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """(the dict holding it, its key) of the first adapter ShardedTensor, in sorted key order."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for section in sharded_state_dict.values():
        if not isinstance(section, dict):
            continue
        for key in sorted(section):
            value = section[key]
            if isinstance(value, ShardedTensor) and ".adapter." in value.key and value.flattened_range is None:
                return section, key
    return None


def dp_rank1_writes_own_copy(original: Callable[..., Any]) -> Callable[..., Any]:
    """``dist_checkpointing.save`` where data-parallel rank 1 writes its own copy (off by 1e-3) of the first
    adapter shard: it claims the main replica of that shard and DP rank 0 gives it up, so Megatron's
    deduplication by ``replica_id`` keeps exactly one copy, the wrong one. Every other shard is as usual."""

    @functools.wraps(original)
    def save(sharded_state_dict: Any, checkpoint_dir: Any, *args: Any, **kwargs: Any) -> Any:
        from megatron.core import parallel_state as ps

        found = _first_adapter_shard(sharded_state_dict)
        dp = ps.get_data_parallel_rank()
        if found and dp in (0, 1) and ps.get_data_parallel_world_size() > 1:
            section, key = found
            shard = section[key]
            rid = shard.replica_id if isinstance(shard.replica_id, tuple) else (shard.replica_id,)
            if dp == 1:
                shard = dataclasses.replace(shard, data=shard.data.detach().clone() + 1e-3, replica_id=(0,) * len(rid))
            else:
                shard = dataclasses.replace(shard, replica_id=(*rid[:-1], 1))
            section[key] = shard
        return original(sharded_state_dict, checkpoint_dir, *args, **kwargs)

    return save


def sp_gather_drops_last_chunk(original: Callable[..., Any]) -> Callable[..., Any]:
    """``gather_from_sequence_parallel_region`` as the bridge's LoRA adapters call it (before LoRA-A of
    column-parallel layers under SP) returning the last TP rank's sequence chunk as zeros: the adapter then
    acts on the first ``(tp - 1) / tp`` of the sequence alone."""

    @functools.wraps(original)
    def gather(input_: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        out = original(input_, *args, **kwargs)
        chunk = input_.shape[0]  # the local sequence length: [s / tp, b, h] in, [s, b, h] out
        return torch.cat([out[:-chunk], torch.zeros_like(out[-chunk:])])

    return gather


def exchange_corrupts_received(original: Callable[..., Any]) -> Callable[..., Any]:
    """``exchange_by_distribution``, the fully parallel load's exchange of the shards each data-parallel rank
    read (what ``load_peft_adapter_checkpoint`` loads through), returning every shard it received from a
    peer off by 1e-3; what a rank read itself is as read."""

    @functools.wraps(original)
    def exchange(loaded_tensors: dict[Any, Any], *args: Any, **kwargs: Any) -> dict[Any, Any]:
        out = original(loaded_tensors, *args, **kwargs)
        return {k: v + 1e-3 if k not in loaded_tensors and v.is_floating_point() else v for k, v in out.items()}

    return exchange
