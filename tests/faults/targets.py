"""What the faults aim at and what the cells must say: upstream module names the wrappers patch, and the
patterns of the harness's messages a caught fault's reason must contain (shared by the fault modules)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from faults import tamper
from faults.tamper import Wrap

AUTO_BRIDGE = "megatron.bridge.models.conversion.auto_bridge"
PEFT_BRIDGE = "megatron.bridge.models.conversion.peft_bridge"
PARAM_MAPPING = "megatron.bridge.models.conversion.param_mapping"
PEFT_UTILS = "megatron.bridge.peft.utils"
DIST_CKPT = "megatron.core.dist_checkpointing"
FULLY_PARALLEL = "megatron.core.dist_checkpointing.strategies.fully_parallel"
CKPT_FILTER = "megatron.bridge.training.checkpointing"
MODEL_BRIDGE = "megatron.bridge.models.conversion.model_bridge"
LORA_MERGE = "megatron.bridge.peft.lora_merge"
GPT_SPECS = "megatron.core.models.gpt.gpt_layer_specs"

# What a logits mismatch says (compat/checks/compare.py), with the measured difference and tolerance.
LOGITS = r"Megatron logits differ from peft\.PeftModel logits: mismatched elements: \d+ / \d+"
DIFF = (
    r"greatest absolute difference: \d\.\d+e[-+]\d+ at sequence \d+, position \d+, token \d+ "
    r"\(up to [\d.e-]+ allowed\)"
)
# What the at-rest oracle (compat/rank/delta_oracle.py) says, naming the HF weights of .format(modules) (a regex).
DELTAS = (
    r"the exported delta, mapped into Megatron's layout by the bridge's import conversion, differs from "
    r"Megatron's stored delta in \d+ of \d+ weights .*\.layers\.{}\.weight[^(]* \(layer \d+(?: expert \d+)?, rows "
)


FP32_DIFF = r"greatest absolute difference: \d\.\d+e[-+]\d+ at .* \(up to 1e-05 allowed\)"


def diverges_at(layer: int, part: str) -> str:
    return rf"first divergence: layer {layer} {part} \(max \|diff\| \d\.\d+e[-+]\d+, up to 1e-05 allowed\)"


def weights_differ(modules: str) -> str:
    """peft's merged weights differ from the bridge's merged export in the tensors ``modules`` (a regex) names."""
    return (
        r"peft merge_and_unload's weights differ from the bridge's merged HF export in \d+ of \d+ tensors, "
        rf"e\.g\. model\.layers\.{modules}\.weight \(max \|diff\| \d\.\d+e[-+]\d+, up to atol="
    )


def mismatch_at(layer: int, part: str, modules: str = "") -> dict[str, tuple[str, ...]]:
    """In fp32: a logits mismatch located at ``layer`` ``part`` against 1e-05. In every dtype: the merged
    weights and deltas differ in ``modules`` (where the fault is in the adapter export alone), or the logits do."""
    common = (weights_differ(modules), DELTAS.format(modules)) if modules else (LOGITS, DIFF)
    return {"expect": common, "fp32": (LOGITS, FP32_DIFF, diverges_at(layer, part))}


def _export(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[str, str, Wrap]:
    return (AUTO_BRIDGE, "AutoBridge.export_adapter_weights", tamper.transform_export(fn))


def _saved(fn: Callable[[Path], None]) -> tuple[str, str, Wrap]:
    return (AUTO_BRIDGE, "AutoBridge.save_hf_adapter", tamper.after_adapter_saved(fn))


WITHOUT_MERGED_EXPORT = (AUTO_BRIDGE, "AutoBridge.save_hf_weights", tamper.without_merged_export)
