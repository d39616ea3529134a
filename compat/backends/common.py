"""What both backends share: inputs' masks and positions, and the TE-only fusions to turn off."""

from __future__ import annotations

import torch

# Provider fields for fusions that need Transformer Engine or CUDA kernels; off with the local spec.
TE_FUSIONS = (
    "gradient_accumulation_fusion",
    "apply_rope_fusion",
    "masked_softmax_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "persist_layer_norm",
    "cross_entropy_loss_fusion",
    "moe_grouped_gemm",
    "moe_permute_fusion",
    "moe_router_fusion",
    "moe_shared_expert_overlap",
)


def turn_off_te_fusions(provider: object) -> None:
    """The local layer spec runs none of the TE/CUDA fusions: turn them off before finalize()."""
    for key in TE_FUSIONS:
        if hasattr(provider, key):
            setattr(provider, key, False)


def causal_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask, True where attention is masked (Megatron's convention)."""
    s = input_ids.shape[1]
    return torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=input_ids.device), diagonal=1)


def position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, -1)
