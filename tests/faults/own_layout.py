"""Plugins that write a layout of their own, as verl's checkpoint manager does, for the plugin-path tests.

``save`` puts the default saver's dist checkpoint in ``path/model/dist_ckpt`` and returns it, and
leaves a temporary file where ``tempfile`` puts one (it must land inside the cell); ``load`` reads
it from there; ``export`` writes the HF adapter to ``path/model/huggingface/adapter``. ``save_outside``
returns a directory outside the cell. Nothing here imports torch or megatron at module level.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

__all__ = ["export", "load", "save", "save_outside"]


def _dist(path: Path) -> Path:
    return Path(path) / "model" / "dist_ckpt"


def save(bridge: Any, model: list, peft: Any, path: Path) -> Path:
    import torch.distributed as dist

    from compat.rank.checkpoint import default_saver

    with tempfile.NamedTemporaryFile(prefix="own_layout_", suffix=".lock", delete=False):
        pass
    if dist.get_rank() == 0:
        _dist(path).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    default_saver(bridge, model, peft, _dist(path))
    return _dist(path)


def load(bridge: Any, model: list, peft: Any, path: Path) -> None:
    from compat.rank.checkpoint import default_loader

    default_loader(bridge, model, peft, _dist(path))


def export(bridge: Any, model: list, peft: Any, path: Path, base: Path) -> Path:
    from compat.rank.export import default_exporter

    where = Path(path) / "model" / "huggingface" / "adapter"
    default_exporter(bridge, model, peft, where, base)
    return where


def save_outside(bridge: Any, model: list, peft: Any, path: Path) -> str:
    save(bridge, model, peft, path)
    return Path(path).parent.parent  # the directory above the cell's
