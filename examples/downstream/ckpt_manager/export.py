"""Export the LoRA adapter of a Megatron model as an HF PEFT directory, the way a checkpoint manager does.

The manager writes into a staging directory next to the target and renames it into place once every
rank is done, so a reader never sees half an adapter; it records which step wrote it. The harness
calls ``export_adapter`` on every rank, where its own default would call ``save_hf_adapter``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist


def export_adapter(bridge: Any, model: list, peft: Any, path: Path, base: Path) -> None:
    staging = path.with_name(path.name + ".staging")
    bridge.save_hf_adapter(
        model, str(staging), peft_config=peft, base_model_name_or_path=str(base), show_progress=False
    )
    dist.barrier()
    if dist.get_rank() == 0:
        (staging / "ckpt_manager.json").write_text(json.dumps({"step": 0, "source": "megatron"}))
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)
    dist.barrier()
