"""An exported HF PEFT adapter read from its files alone: each module's factors and scaling, as peft scales.

The oracles' HF side: what the files say each module adds, ``scaling * lora_B @ lora_A`` with
``scaling = lora_alpha / r`` (``rank_pattern``/``alpha_pattern`` per module, rsLoRA's
``alpha / sqrt(r)``), and DoRA's magnitudes. Read from the safetensors and the config, never from
peft's loaded model (which the in-flight oracle judges) or the bridge's export code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compat.checks.adapter_names import lora_module, module_scaling

__all__ = ["Factors", "FileAdapter", "LazyDeltas"]


@dataclass(frozen=True)
class Factors:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float


class FileAdapter:
    """The factors of every well-formed LoRA pair of an adapter (``peft_files`` reports the rest): an exported
    directory (:meth:`read`), or tensors and a config as an RL framework hands them over in memory, their
    names with or without peft's ``base_model.model.`` prefix."""

    def __init__(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.config = config
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        self.magnitudes: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            module, kind = lora_module(key)
            if kind == "lora_magnitude_vector":
                self.magnitudes[module] = t
            elif kind:
                pairs.setdefault(module, {})[kind[-1]] = t
        self.factors: dict[str, Factors] = {}
        for module, ab in pairs.items():
            a, b = ab.get("A"), ab.get("B")
            if a is None or b is None or a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                continue
            self.factors[module] = Factors(a, b, self.scaling(module))

    @classmethod
    def read(cls, directory: Path, device: Any = "cpu") -> FileAdapter:
        """From an exported directory: ``adapter_config.json`` and ``adapter_model.safetensors``."""
        from safetensors.torch import load_file

        config = json.loads((directory / "adapter_config.json").read_text())
        return cls(config, load_file(str(directory / "adapter_model.safetensors"), device=str(device)))

    def scaling(self, module: str) -> float:
        return module_scaling(self.config, module)[2]

    def delta(self, module: str) -> torch.Tensor:
        """fp32 ``scaling * B @ A`` of one module."""
        f = self.factors[module]
        return f.scaling * (f.b.float() @ f.a.float())


class LazyDeltas(Mapping[str, torch.Tensor]):
    """HF weight name -> the file's fp32 delta, computed when read (at real widths all deltas at once
    are the model's size); zeros of the base weight's shape where the file adapts nothing."""

    def __init__(self, files: FileAdapter, base_shapes: dict[str, tuple[int, ...]], device: Any) -> None:
        self.files, self.shapes, self.device = files, base_shapes, device

    def __getitem__(self, name: str) -> torch.Tensor:
        module = name.removesuffix(".weight")
        if module in self.files.factors:
            return self.files.delta(module).to(self.device)
        if module not in self.shapes:
            raise KeyError(name)
        return torch.zeros(self.shapes[module], dtype=torch.float32, device=self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(f"{m}.weight" for m in self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.removesuffix(".weight") in self.shapes
