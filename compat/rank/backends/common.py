"""What both backends share: the inputs' attention mask and positions."""

from __future__ import annotations

import torch


def causal_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask, True where attention is masked (Megatron's convention)."""
    s = input_ids.shape[1]
    return torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=input_ids.device), diagonal=1)


def position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, -1)
