"""megatron-lora-compat: does a LoRA adapter survive Megatron -> dist checkpoint -> HF PEFT?"""

from compat.cells import Cell
from compat.layouts import Layout

__all__ = ["Cell", "Layout"]
