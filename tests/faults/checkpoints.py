"""Faults in the checkpoint's save and load: files damaged after saving, values a load hands back wrongly,
a PEFT filter that keeps or drops the wrong tensors, the bridge's own loader restoring a value wrongly."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faults.tamper import _rank


def corrupt(directory: Path) -> None:
    """Overwrite the middle quarter of rank 0's shard with bytes of another pattern."""
    path = directory / "__0_0.distcp"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size * 3 // 8)
        f.write(bytes([0x5A]) * (size // 4))


def _first_adapter(section: dict[str, Any]) -> str | None:
    """The first adapter tensor of a loaded state-dict section."""
    return next((k for k in sorted(section) if ".adapter." in k and hasattr(section[k], "add_")), None)


def perturb_loaded_on_rank1(original: Callable[..., Any]) -> Callable[..., Any]:
    """As ``perturb_loaded``, on rank 1 alone: the rank that finds the problem is not the one that reports."""
    perturbed = perturb_loaded(original)

    @functools.wraps(original)
    def load(*args: Any, **kwargs: Any) -> Any:
        return (perturbed if _rank() == 1 else original)(*args, **kwargs)

    return load


def perturb_loaded(original: Callable[..., Any]) -> Callable[..., Any]:
    """``dist_checkpointing.load`` hands back one adapter tensor off by 1e-3 (a loader that corrupts)."""

    @functools.wraps(original)
    def load(sharded_state_dict: Any, checkpoint_dir: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        for section in out.values():
            key = _first_adapter(section) if isinstance(section, dict) else None
            if key:
                section[key].add_(1e-3)
                break
        return out

    return load


def filter_keeps_a_base_tensor(original: Callable[..., Any]) -> Callable[..., Any]:
    """The PEFT filter lets the first base-model tensor of each rank through into the checkpoint."""

    @functools.wraps(original)
    def apply(state_dict: dict[str, Any], peft: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(state_dict, peft, *args, **kwargs)
        for name, section in state_dict.items():
            if not isinstance(section, dict) or name not in out:
                continue
            base = [k for k in sorted(section) if ".adapter." not in k and "_extra_state" not in k]
            if base:
                out[name][base[0]] = section[base[0]]
                break
        return out

    return apply


def filter_drops_fc1_lora_a(original: Callable[..., Any]) -> Callable[..., Any]:
    """The PEFT filter loses the MLP fc1 LoRA-A of every layer: neither saved nor loaded (dropping one layer
    alone is refused by megatron-core's own sharding validation at save)."""

    @functools.wraps(original)
    def apply(state_dict: dict[str, Any], peft: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(state_dict, peft, *args, **kwargs)
        for section in out.values():
            for key in [k for k in section if k.endswith("mlp.linear_fc1.adapter.linear_in.weight")]:
                del section[key]
        return out

    return apply


def bridge_loader_corrupts(original: Callable[..., Any]) -> Callable[..., Any]:
    """``load_peft_adapter_checkpoint`` leaves one adapter parameter off by 1e-3 after loading."""

    @functools.wraps(original)
    def load(model: list, *args: Any, **kwargs: Any) -> Any:
        out = original(model, *args, **kwargs)
        import torch

        with torch.no_grad():
            next(p for name, p in model[0].named_parameters() if ".adapter." in name).add_(1e-3)
        return out

    return load
