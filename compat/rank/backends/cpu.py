"""CPU ranks over gloo: what no GPU-only harness offers, so CI can run the matrix anywhere."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from compat.rank.backends.common import causal_mask, position_ids

__all__ = ["CpuBackend"]


class CpuBackend:
    name = "cpu"
    dist_backend = "gloo"

    def setup(self, local_rank: int) -> None:
        from compat.rank import workarounds

        workarounds.apply("cpu")

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def configure(self, provider: Any) -> None:
        if getattr(provider, "num_moe_experts", None):
            # The alltoall dispatcher creates a CUDA stream; allgather runs over gloo.
            provider.moe_token_dispatcher_type = "allgather"

    def forward(self, model: list, input_ids: torch.Tensor, hidden_size: int) -> torch.Tensor | None:
        """Forward-only pass across (virtual) pipeline stages with point-to-point send/recv.

        Megatron's schedules allocate on "cuda"; this walks the same stage order: virtual stage
        ``v * pp + rank`` receives from the stage before it and sends to the one after.
        """
        from megatron.core import parallel_state as ps

        pp = ps.get_pipeline_model_parallel_world_size()
        rank = ps.get_pipeline_model_parallel_rank()
        group = ps.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(group) if pp > 1 else [dist.get_rank()]
        mask, pos = causal_mask(input_ids), position_ids(input_ids)
        out = None
        for v, chunk in enumerate(model):
            stage = v * pp + rank
            last_stage = len(model) * pp - 1
            if stage > 0:
                buf = torch.empty(_stage_tokens(chunk, input_ids), input_ids.shape[0], hidden_size, dtype=_dtype(chunk))
                dist.recv(buf, src=ranks[(rank - 1) % pp])
                chunk.set_input_tensor(buf)
            out = chunk(input_ids=input_ids, position_ids=pos, attention_mask=mask)
            if stage < last_stage:
                dist.send(out.contiguous(), dst=ranks[(rank + 1) % pp])
                out = None
        return out


def _stage_tokens(chunk: torch.nn.Module, input_ids: torch.Tensor) -> int:
    """Tokens a stage hands on: this TP rank's chunk of the sequence under sequence parallelism."""
    from compat.rank.model_build import unwrap

    config = unwrap(chunk).config
    return input_ids.shape[1] // (config.tensor_model_parallel_size if config.sequence_parallel else 1)


def _dtype(chunk: torch.nn.Module) -> torch.dtype:
    return next(chunk.parameters()).dtype
