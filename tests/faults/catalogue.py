"""The fault catalogue: each fault the harness must catch, planted where it would really happen.

A fault is data: the smallest cell that shows it, the upstream functions it wraps (patched in every rank
right after their module is imported, ``hook.py``; the wrappers: ``tamper.py``, ``checkpoints.py``, ...),
and the patterns its ``reason`` must contain in every dtype (``expect``) and in fp32 alone (``fp32``).
``COMPAT_FAULT=<name>`` with ``tests/faults/plant`` on PYTHONPATH plants it. Nothing here imports torch
or megatron at module level: the test process reads the catalogue, only the ranks run the wrappers.

Check faults (``kind="check"``) must end the cell ``fail``, in fp32 and in bf16; run faults (``runs.py``)
break the run itself (tests/test_run_faults.py); shape faults must be found and shrunk by ``compat fuzz``
(tests/test_fuzz.py); unmet faults add a problem to a cell expected to fail and must leave it unmet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from faults import checkpoints, parallel, tamper
from faults.fault import Fault
from faults.oracles import ORACLE_FAULTS
from faults.runs import RUN_FAULTS
from faults.stream import STREAM_FAULTS
from faults.tamper import Wrap
from faults.targets import (
    AUTO_BRIDGE,
    CKPT_FILTER,
    DELTAS,
    DIST_CKPT,
    FULLY_PARALLEL,
    LORA_MERGE,
    MODEL_BRIDGE,
    PARAM_MAPPING,
    PEFT_BRIDGE,
    PEFT_UTILS,
    WITHOUT_MERGED_EXPORT,
    _export,
    _saved,
    mismatch_at,
)

__all__ = ["FAULTS", "WITHOUT_MERGED_EXPORT", "Fault", "by_name"]  # Fault re-exported from faults.fault


def _config(fn: Callable[[dict[str, Any]], None]) -> tuple[str, str, Wrap]:
    return _saved(tamper.edit_config(fn))


FAULTS: tuple[Fault, ...] = (
    Fault(
        "qk_rows_swapped",
        "q and k adapter rows swapped in the fused QKV split (layer 1)",
        "llama",
        "tp1",
        (_export(tamper.swap_qk_rows),),
        **mismatch_at(1, "self_attn", r"1\.self_attn\.[qk]_proj"),
    ),
    Fault(
        "gqa_groups_interleaved",
        "q_proj lora_B rows permuted by head group (layer 3)",
        "llama",
        "tp1",
        (_export(tamper.interleave_gqa),),
        **mismatch_at(3, "self_attn", r"3\.self_attn\.q_proj"),
    ),
    Fault(
        "gate_up_swapped",
        "gate and up swapped in the fused fc1 split (layer 2)",
        "llama",
        "tp1",
        (_export(tamper.swap_gate_up),),
        **mismatch_at(2, "mlp", r"2\.mlp\.(gate|up)_proj"),
    ),
    Fault(
        "lora_ab_exchanged",
        "lora_A and lora_B exchanged (layer 0 o_proj)",
        "llama",
        "tp1",
        (_export(tamper.exchange_ab),),
        (
            r"rank_pattern gives 'model\.layers\.0\.self_attn\.o_proj' r=64; the adapter has r=8",
            r"model\.layers\.0\.self_attn\.o_proj\.lora_A\.weight has shape \(64, 8\), expected",
        ),
    ),
    Fault(
        "lora_ab_transposed",
        "lora_A and lora_B transposed (layer 0 v_proj)",
        "llama",
        "tp1",
        (_export(tamper.transpose_ab),),
        (
            r"rank_pattern gives 'model\.layers\.0\.self_attn\.v_proj' r=64; the adapter has r=8",
            r"model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight has shape \(64, 8\), expected",
            r"model\.layers\.0\.self_attn\.v_proj\.lora_B\.weight has shape \(8, 32\), expected",
        ),
    ),
    Fault(
        "expert_dropped",
        "expert 2's adapter left out of the export (every layer)",
        "qwen3_moe",
        "tp1",
        (_export(tamper.drop_expert),),
        (r"the export has no adapter for 12 of the \d+ modules", r"model\.layers\.\{0,1,2,3\}\.mlp\.experts\.\{2\}\."),
    ),
    Fault(
        "expert_duplicated",
        "expert 1's adapter written again as expert 2's (layer 1)",
        "qwen3_moe",
        "tp1",
        (_export(tamper.duplicate_expert),),
        **mismatch_at(1, "mlp", r"1\.mlp\.experts\.2\.(gate|up|down)_proj"),
    ),
    Fault(
        "experts_permuted",
        "expert adapters rotated by one index (layer 0)",
        "qwen3_moe",
        "tp1",
        (_export(tamper.permute_experts),),
        **mismatch_at(0, "mlp", r"0\.mlp\.experts\.\d\.(gate|up|down)_proj"),
    ),
    Fault(  # the merged export hidden as before merge_adapter_weights: the bf16 logits alone let it pass
        "q_heads_rotated",
        "q_proj lora_B rows rolled by one head (layer 1), without the bridge's merged export",
        "llama",
        "tp1",
        ((AUTO_BRIDGE, "AutoBridge.export_adapter_weights", tamper.rotate_q_heads), WITHOUT_MERGED_EXPORT),
        (DELTAS.format(r"1\.self_attn\.q_proj"),),
    ),
    Fault(
        "tp_shards_reversed",
        "TP shards gathered in the wrong order on export",
        "llama",
        "tp=2",
        ((PARAM_MAPPING, "MegatronParamMapping.gather_from_tp_ranks", tamper.reverse_tp_gather),),
        **mismatch_at(0, "self_attn"),
    ),
    Fault(
        "pp_stage_missing",
        "the second pipeline stage's adapters (layers 2, 3) missing from the export",
        "llama",
        "pp=2",
        (_export(tamper.drop_second_stage),),
        (r"the export has no adapter for 14 of the 28 modules", r"model\.layers\.\{2,3\}\."),
    ),
    Fault(
        "lora_alpha_wrong",
        "lora_alpha in adapter_config.json is 32 instead of 16",
        "llama",
        "tp1",
        (_config(lambda c: c.update(lora_alpha=32)),),
        (r"adapter_config\.json: lora_alpha is 32, expected 16",),
    ),
    Fault(
        "base_weight_in_adapter",
        "the base model's embed_tokens written, unchanged, into adapter_model.safetensors",
        "llama",
        "tp1",
        (_saved(tamper.add_base_weight),),
        (
            r"1 tensors of the file have no place a check can find in the model peft loaded, "
            r"e\.g\. base_model\.model\.model\.embed_tokens\.weight \(not a LoRA tensor name",
        ),
    ),
    Fault(
        "r_wrong",
        "r in adapter_config.json is 4 instead of 8",
        "llama",
        "tp1",
        (_config(lambda c: c.update(r=4)),),
        (r"adapter_config\.json: r is 4, expected 8", r"lora_A\.weight has shape \(8, 64\), expected \(4, 64\)"),
    ),
    Fault(
        "target_module_missing",
        "v_proj missing from target_modules in adapter_config.json",
        "llama",
        "tp1",
        (_config(lambda c: c["target_modules"].remove("v_proj")),),
        (r"target_modules \[.*\] does not name 4 modules with tensors, e\.g\. \['model\.layers\.0\.self_attn\.v_proj",),
    ),
    Fault(
        "adapter_zeroed",
        "adapter zeroed on both sides (Megatron forward and export): logits still match",
        "llama",
        "tp1",
        (
            (PEFT_UTILS, "ParallelLinearAdapter.forward", tamper.zero_adapter_forward),
            _export(tamper.zero_b),
        ),
        (r"the adapter does not change the logits beyond the tolerance: without it 0 / \d+ \(0\.0%\) logits differ",),
    ),
    Fault(
        "keys_unprefixed",
        "adapter keys written without the base_model.model. prefix",
        "llama",
        "tp1",
        ((PEFT_BRIDGE, "convert_adapter_weights_to_peft_state", tamper.strip_prefix),),
        (r"\d+ of \d+ tensors are not LoRA weight names peft loads \(no 'base_model\.model\.' prefix",),
    ),
    Fault(
        "rank_pattern_orphan",
        "a rank_pattern key in adapter_config.json that matches no module",
        "llama",
        "tp1",
        ((PEFT_BRIDGE, "infer_rank_pattern_from_adapter_weights", tamper.orphan_rank_pattern),),
        (r"rank_pattern key 'model\.layers\.9\.self_attn\.q_proj' matches no module with adapter tensors",),
    ),
    Fault(
        "checkpoint_truncated",
        "a dist checkpoint shard truncated to half its size after saving",
        "llama",
        "tp1",
        ((DIST_CKPT, "save", tamper.after_checkpoint_saved(tamper.truncate(lambda d: d / "__0_0.distcp"))),),
        (
            r"rank 0: cannot load the adapter checkpoint",
            r"checkpoint/__0_0\.distcp is \d+ bytes, its metadata places data up to byte \d+",
        ),
    ),
    Fault(
        "checkpoint_corrupted",
        "a dist checkpoint shard overwritten in the middle after saving (same size)",
        "llama",
        "tp1",
        ((DIST_CKPT, "save", tamper.after_checkpoint_saved(checkpoints.corrupt)),),
        (r"rank 0: cannot load the adapter checkpoint", r"checkpoint/__0_0\.distcp bytes \d+-\d+ \(\S+\) do not load"),
    ),
    Fault(
        "safetensors_truncated",
        "adapter_model.safetensors truncated to half its size after export",
        "llama",
        "tp1",
        (_saved(tamper.truncate(lambda d: d / "adapter_model.safetensors")),),
        (r"adapter_model\.safetensors cannot be read",),
    ),
    Fault(
        "loaded_adapter_corrupted",
        "the checkpoint load hands back one adapter tensor off by 1e-3",
        "llama",
        "tp1",
        ((DIST_CKPT, "load", checkpoints.perturb_loaded),),
        (r"rank 0: adapter not restored: \S+adapter\S+ \(chunk 0\): max \|diff\| \d\.\d+e-03, expected bit-exact",),
    ),
    Fault(
        "load_moves_base_weight",
        "loading the adapter checkpoint into the model also moves one base weight by 1e-3",
        "llama",
        "tp1",
        (("torch.nn.modules.module", "Module.load_state_dict", tamper.load_bumps_a_base_weight),),
        (
            r"rank 0: base weight changed by adapter load: \S+ \(chunk 0\): max \|diff\| \d\.\d+e-0[34], "
            r"expected bit-exact",
        ),
    ),
    Fault(
        "loaded_adapter_corrupted_on_rank1",
        "the checkpoint load hands back one adapter tensor off by 1e-3 on rank 1 only",
        "llama",
        "tp=2",
        ((DIST_CKPT, "load", checkpoints.perturb_loaded_on_rank1),),
        (r"rank 1: adapter not restored: \S+adapter\S+ \(chunk 0\): max \|diff\| \d\.\d+e-03, expected bit-exact",),
    ),
    Fault(
        "base_tensor_in_checkpoint",
        "the PEFT filter lets a base-model tensor into the adapter checkpoint",
        "llama",
        "tp=2",
        ((CKPT_FILTER, "apply_peft_adapter_filter_to_state_dict", checkpoints.filter_keeps_a_base_tensor),),
        (r"rank 0: checkpoint holds \d+ base-model tensors, e\.g\. \['\S+'",),
    ),
    Fault(
        "adapter_left_out_of_checkpoint",
        "the PEFT filter drops the MLP fc1 LoRA-A of every layer from the checkpoint",
        "llama",
        "tp1",
        ((CKPT_FILTER, "apply_peft_adapter_filter_to_state_dict", checkpoints.filter_drops_fc1_lora_a),),
        (
            r"rank 0: checkpoint lacks 4 of \d+ adapter shards, e\.g\. "
            r"\['decoder\.layers\.mlp\.linear_fc1\.adapter\.linear_in\.weight at offset \(0, 0, 0\)'",
        ),
    ),
    Fault(
        "bridge_loader_corrupts",
        "the bridge's own loader (load_peft_adapter_checkpoint) restores one value wrongly",
        "llama",
        "tp1",
        ((PEFT_UTILS, "load_peft_adapter_checkpoint", checkpoints.bridge_loader_corrupts),),
        (r"load_peft_adapter_checkpoint: \S+adapter\S+ \(chunk 0\): max \|diff\| \d\.\d+e-03, expected bit-exact",),
    ),
    Fault(
        "reshard_export_differs",
        "after resharding tp2 -> tp1 the export differs from the one at the save layout",
        "llama",
        "tp=2:tp1",
        (_export(tamper.perturb_when_alone),),
        (
            r"\[load\] 1 of \d+ tensors differ from the export at the save layout, e\.g\. "
            r"base_model\.model\.model\.layers\.3\.self_attn\.o_proj\.lora_A\.weight \(max \|diff\| \d\.\d+e-03\)",
        ),
    ),
    Fault(
        "base_weight_converted_wrong",
        "HF -> Megatron conversion loads one base weight wrongly (layer 2 MLP output, +0.05)",
        "llama",
        "tp1",
        ((MODEL_BRIDGE, "MegatronModelBridge.load_weights_hf_to_megatron", tamper.base_weight_off),),
        (
            r"the base models differ before any adapter: Megatron with its adapters off vs the HF model: "
            r"mismatched elements: \d+ / \d+",
        ),
    ),
    Fault(
        "router_rows_swapped",
        "HF -> Megatron conversion loads layer 1's router with experts 0 and 1 swapped",
        "qwen3_moe",
        "tp1",
        ((MODEL_BRIDGE, "MegatronModelBridge.load_weights_hf_to_megatron", tamper.router_rows_swapped),),
        (
            r"base: \d+ tokens routed otherwise, not near-ties \(margin <= 2 x drift <= noise\): "
            r"layer 1 sequence \d position \d+",
        ),
    ),
    Fault(
        "merge_in_place_raises",
        "the bridge's merge raises on rank 1 when Megatron merges the adapters in place",
        "llama",
        "tp=2",
        ((LORA_MERGE, "LoRAMerge.merge", tamper.merge_in_place_raises_on_rank1),),
        (
            r"the bridge's in-place merge raised RuntimeError: planted fault: The size of tensor a \(\d+\) "
            r"must match the size of tensor b \(\d+\) at megatron/bridge/peft/lora_layers\.py:\d+ "
            r"\(merging decoder\.layers\.0\.self_attention\.linear_proj\)",
        ),
    ),
    Fault(
        "dp_rank1_writes_own_copy",
        "data-parallel rank 1 writes its own copy (off by 1e-3) of an adapter shard as the one the checkpoint keeps",
        "llama",
        "dp=2",
        ((DIST_CKPT, "save", parallel.dp_rank1_writes_own_copy),),
        (
            r"rank 0: adapter not restored: \S+adapter\S+ \(chunk 0\): max \|diff\| \d\.\d+e-0[34], expected bit-exact",
            r"rank 0: its copy in the checkpoint \(\S+adapter\S+ at offset \([\d, ]+\)\) was written by rank 1 "
            r"\(__1_\d+\.distcp\)",
        ),
    ),
    Fault(  # before issue 34 the CPU backend bypassed this exchange: the fault went unseen
        "dp_load_exchange_corrupted",
        "the fully parallel load's exchange over the data-parallel group delivers what a peer read off by 1e-3",
        "llama",
        "dp=2",
        ((FULLY_PARALLEL, "exchange_by_distribution", parallel.exchange_corrupts_received),),
        (r"load_peft_adapter_checkpoint: \S+adapter\S+ \(chunk 0\): max \|diff\| \d\.\d+e-0[34], expected bit-exact",),
    ),
    Fault(
        "sp_gather_drops_last_chunk",
        "the sequence-parallel gather before LoRA-A returns the last TP rank's sequence chunk as zeros",
        "llama",
        "tp=2,sp=1",
        ((PEFT_UTILS, "gather_from_sequence_parallel_region", parallel.sp_gather_drops_last_chunk),),
        **mismatch_at(0, "self_attn"),
    ),
)


# One more of what an expected failure already shows: the expectation must not absorb it (tests/test_faults.py).
FAULTS += (
    Fault(
        "expert_1_dropped",
        "expert 1's adapter left out of the export (every layer), beside the experts EP loses",
        "qwen3_moe",
        "ep=2",
        (_export(tamper.drop_expert_1),),
        kind="unmet",
    ),
)

# A fault only some shapes show: compat fuzz's ci profile must find it and shrink it (tests/test_fuzz.py).
FAULTS += (
    Fault(
        "q_width_not_hidden",
        "layer 0 q_proj lora_B rows reversed only where heads x head_dim != hidden (shape-only)",
        "llama",
        "tp1",
        ((AUTO_BRIDGE, "AutoBridge.export_adapter_weights", tamper.reverse_q_when_not_hidden),),
        **mismatch_at(0, "self_attn", r"0\.self_attn\.q_proj"),
        kind="shape",
    ),
)


# Faults of the adapter stream a rollout takes in memory, which the files do not show (faults/stream.py).
FAULTS += ORACLE_FAULTS + RUN_FAULTS + STREAM_FAULTS


def by_name(name: str) -> Fault:
    for fault in FAULTS:
        if fault.name == name:
            return fault
    known = ", ".join(f.name for f in FAULTS)
    raise KeyError(f"unknown fault {name!r} (COMPAT_FAULT); known: {known}")
