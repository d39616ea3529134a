"""One GPU per rank over NCCL: Megatron's own forward-only pipeline schedule, alltoall dispatcher."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from compat.rank.backends.common import causal_mask, position_ids

__all__ = ["CudaBackend"]


class CudaBackend:
    name = "cuda"
    dist_backend = "nccl"

    def __init__(self, rank_env: dict[str, str]) -> None:
        # Given by compat.rank.backends (CUDA_RANK_ENV), which imports this module: no import back.
        self.rank_env = rank_env

    def setup(self, local_rank: int) -> None:
        for key, value in self.rank_env.items():  # ranks started by an outside launcher (torchrun) too
            os.environ.setdefault(key, value)
        torch.cuda.set_device(local_rank)
        from compat.rank import workarounds

        workarounds.apply("cuda")

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def configure(self, provider: Any) -> None:
        if getattr(provider, "num_moe_experts", None):
            provider.moe_token_dispatcher_type = "alltoall"

    def forward(self, model: list, input_ids: torch.Tensor, hidden_size: int) -> torch.Tensor | None:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        mask, pos = causal_mask(input_ids), position_ids(input_ids)

        def step(data_iterator: object, chunk: Any) -> tuple[torch.Tensor, Callable[..., Any]]:
            out = chunk(input_ids=input_ids, position_ids=pos, attention_mask=mask)
            return out, lambda output, **_: (torch.zeros((), device=output.device), {"logits": output})

        # The interleaved (VPP) schedule needs at least PP micro-batches: repeat the batch, keep the first.
        microbatches = ps.get_pipeline_model_parallel_world_size() if len(model) > 1 else 1
        store = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=[iter([None] * microbatches) for _ in model] if len(model) > 1 else iter([None]),
            model=model,
            num_microbatches=microbatches,
            seq_length=input_ids.shape[1],
            micro_batch_size=input_ids.shape[0],
            forward_only=True,
        )
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        return store[0]["logits"]
