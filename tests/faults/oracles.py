"""Faults only the per-module oracles see: a forward that adds its delta otherwise than it stores it, an
export-direction split that moves every Megatron -> HF conversion alike, one module's delta 2% off, NaN on
peft's side. The bridge's merged export is hidden (as before merge_adapter_weights), so no merged-weight
check can be what catches them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from faults.fault import Fault
from faults.tamper import Wrap, _layer
from faults.targets import DELTAS, LOGITS, PARAM_MAPPING, PEFT_BRIDGE, PEFT_UTILS, WITHOUT_MERGED_EXPORT, _export

__all__ = ["ORACLE_FAULTS"]


def scale_adapter_forward(factor: float, experts: bool) -> Wrap:
    """An adapter's forward returns ``factor`` x its output, for expert adapters (``experts``) or for
    attention ones: stored weights, checkpoint and export all right, only the forward pass is off."""

    def applies(adapter: Any) -> bool:
        name = str(getattr(adapter, "base_linear_name", ""))
        is_expert = bool(getattr(adapter, "is_expert", False)) or ".experts." in name
        return is_expert if experts else "self_attention" in name

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(self, x, *args, **kwargs)
            return out * factor if applies(self) else out

        return forward

    return wrap


def swap_key_groups(original: Callable[..., Any]) -> Callable[..., Any]:
    """``split_qkv_weights`` hands back k with query groups 0 and 1 swapped: every Megatron -> HF
    conversion (the adapter export and the base-weight export) moves alike, HF -> Megatron stays right."""

    if getattr(original, "planted", False):  # peft_bridge imported the already wrapped function by name
        return original

    @functools.wraps(original)
    def split_qkv_weights(config: Any, *args: Any, **kwargs: Any) -> Any:
        q, k, v = original(config, *args, **kwargs)
        d = config.kv_channels
        k = k.clone()
        k[: 2 * d] = k[: 2 * d].roll(d, dims=0)
        return q, k, v

    split_qkv_weights.planted = True  # type: ignore[attr-defined]
    return split_qkv_weights


def delta_two_percent_off(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 2's o_proj lora_B written 2% too large."""
    return {k: (v * 1.02 if _layer(k, 2) and k.endswith("o_proj.lora_B.weight") else v) for k, v in w.items()}


def nan_in_peft_logits(original: Callable[..., Any]) -> Callable[..., Any]:
    """peft's model forward returns one NaN logit (sequence 0, position 3, token 5)."""

    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        out.logits[0, 3, 5] = float("nan")
        return out

    return forward


def in_flight(side: str, megatron: str, gain: str) -> str:
    """What the forward oracle says of one side (``Megatron``, ``peft``): a weight named by ``megatron``
    (a regex) whose forward adds ``gain`` x its stored adapter's product, with its layer (and expert)."""
    return (
        rf"in flight, {side}: \d+ of \d+ adapted weights add another contribution in the forward pass than their "
        rf"stored adapter's scale \* x A\^T B\^T: .*{megatron}[^(]* \(layer \d+(?: expert \d+)?, gain {gain}"
    )


EXPERTS = r"decoder\.layers\.\d\.mlp\.experts\.\S+\.weight\d* = model\.layers\.\d\.mlp\.experts\.\d+\."
ATTENTION = r"decoder\.layers\.\d\.self_attention\.linear_(?:qkv|proj)\.weight"
ADAPTER_FORWARDS = ("ParallelLinearAdapter.forward", "GroupedExpertLinearAdapter.forward",
                    "SharedOuterGroupedExpertAdapter.forward")  # fmt: skip


def _scaled(factor: float, experts: bool) -> tuple[tuple[str, str, Wrap], ...]:
    """Every adapter class's forward scaled (which one a cell uses depends on its spec and mode), the
    merged export hidden: the per-module oracles alone must catch it."""
    wrap = scale_adapter_forward(factor, experts)
    return (*((PEFT_UTILS, f, wrap) for f in ADAPTER_FORWARDS), WITHOUT_MERGED_EXPORT)


def _forward_scaled(name: str, what: str, family: str, factor: float, experts: bool, gain: str) -> Fault:
    """Megatron's adapters (experts, or attention) add ``factor`` x their delta in the forward pass only:
    the in-flight oracle names them with that gain."""
    weights = EXPERTS if experts else ATTENTION
    return Fault(name, what, family, "tp1", _scaled(factor, experts), (in_flight("Megatron", weights, gain),))


ORACLE_FAULTS: tuple[Fault, ...] = (
    _forward_scaled(
        "expert_forward_scaled",
        "every expert adapter adds 1.3x its delta in Megatron's forward pass only (stored values, export right)",
        "qwen3_moe",
        1.3,
        True,
        r"1\.(?:29|30)",
    ),
    _forward_scaled(
        "expert_forward_scaled_2pct",
        "every expert adapter adds 1.02x its delta in Megatron's forward pass only",
        "qwen3_moe",
        1.02,
        True,
        r"1\.0[12]",
    ),
    _forward_scaled(
        "attention_forward_scaled_2pct",
        "every attention adapter adds 1.02x its delta in Megatron's forward pass only",
        "llama",
        1.02,
        False,
        r"1\.0[12]",
    ),
    Fault(
        "qkv_export_split_swaps_key_groups",
        "the Megatron -> HF QKV split swaps key groups 0 and 1 (adapter and base exports alike; import right)",
        "llama",
        "tp1",
        (
            (PARAM_MAPPING, "split_qkv_weights", swap_key_groups),
            (PEFT_BRIDGE, "split_qkv_weights", swap_key_groups),
            WITHOUT_MERGED_EXPORT,
        ),
        (DELTAS.format(r"\d\.self_attn\.k_proj"),),
    ),
    Fault(
        "module_delta_2pct",
        "layer 2's o_proj delta exported 2% too large",
        "llama",
        "tp1",
        (_export(delta_two_percent_off), WITHOUT_MERGED_EXPORT),
        (DELTAS.format(r"2\.self_attn\.o_proj"),),
    ),
    Fault(
        "peft_logits_nan",
        "peft's forward returns one NaN logit",
        "llama",
        "tp1",
        (
            ("peft.peft_model", "PeftModel.forward", nan_in_peft_logits),
            ("peft.peft_model", "PeftModelForCausalLM.forward", nan_in_peft_logits),
        ),
        (
            LOGITS
            + r" \(\d+\.\d%\) \(1 not finite\); greatest absolute difference: inf at sequence 0, position 3, token 5",
        ),
    ),
)
