"""Two exporters with bugs a person could write, for the tests to show what the harness says of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ckpt_manager.export import export_adapter


def alpha_as_rank(bridge: Any, model: list, peft: Any, path: Path, base: Path) -> None:
    """Writes the LoRA rank where adapter_config.json wants lora_alpha (scales every adapter by r / alpha)."""
    export_adapter(bridge, model, peft, path, base)
    if dist.get_rank() == 0:
        config = json.loads((path / "adapter_config.json").read_text())
        config["lora_alpha"] = config["r"]
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    dist.barrier()


def drops_a_lora_b(bridge: Any, model: list, peft: Any, path: Path, base: Path) -> None:
    """Filters the tensors it writes and loses one module's lora_B on the way."""
    export_adapter(bridge, model, peft, path, base)
    if dist.get_rank() == 0:
        tensors = load_file(path / "adapter_model.safetensors")
        tensors = {k: v for k, v in tensors.items() if not k.endswith("layers.1.mlp.up_proj.lora_B.weight")}
        save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    dist.barrier()
