"""A verl save that loses adapter tensors: the negative control, planted in verl's own PEFT filter.

``MegatronCheckpointManager._maybe_filter_peft_state_dict`` (verl
``megatron_checkpoint_manager.py:705``) is wrapped to drop every ``linear_fc2`` lora_B
(``adapter.linear_out``) after the bridge's filter ran, as a filter bug would; verl's
non-strict load (``:932``) would resume from it without a word.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from verl_ckpt.manager import save as verl_save

__all__ = ["DROPPED", "save"]

DROPPED = "linear_fc2.adapter.linear_out"


def save(bridge: Any, model: list, peft: Any, path: Path) -> Path:
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager

    original = MegatronCheckpointManager._maybe_filter_peft_state_dict

    def drops_fc2_lora_b(self: Any, state_dict: dict) -> dict:
        return {k: _without(v) for k, v in original(self, state_dict).items()}

    MegatronCheckpointManager._maybe_filter_peft_state_dict = drops_fc2_lora_b
    try:
        return verl_save(bridge, model, peft, path)
    finally:
        MegatronCheckpointManager._maybe_filter_peft_state_dict = original


def _without(section: Any) -> Any:
    if not isinstance(section, dict):
        return section
    return {k: _without(v) for k, v in section.items() if DROPPED not in k}
