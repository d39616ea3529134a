"""The fault catalogue: each fault the harness must catch, planted where it would really happen.

A fault is data: the smallest cell that shows it, the upstream functions it wraps (patched in
every rank right after their module is imported, see ``hook.py``; the wrappers: ``tamper.py``), and
the patterns the cell's ``reason`` must contain, in every dtype it runs in (``expect``) and in fp32
alone (``fp32``: where the fp32 tolerance locates the first divergence). ``COMPAT_FAULT=<name>`` with
``tests/faults/plant`` on PYTHONPATH plants it. Nothing here imports torch or megatron at module
level: the test process reads the catalogue to parametrize, and only the ranks run the wrappers.

Check faults (``kind="check"``) must end the cell ``fail``, in fp32 and in bf16; run faults
(``kind="run"``) break the run itself (a rank raises or hangs, upstream code raises where it used
to be taken for a missing component) and are driven by tests/test_run_faults.py; shape faults
(``kind="shape"``) leave the declared family's cell passing and must be found, and shrunk, by
``compat fuzz`` (tests/test_fuzz.py); unmet faults (``kind="unmet"``) add a problem to a cell expected
to fail and must leave it unmet (tests/test_faults.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from faults import disrupt, parallel, tamper
from faults.fault import Fault
from faults.stream import STREAM_FAULTS
from faults.tamper import Wrap

__all__ = ["FAULTS", "WITHOUT_MERGED_EXPORT", "Fault", "by_name"]  # Fault re-exported from faults.fault

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


def in_flight(side: str, megatron: str, gain: str) -> str:
    """What the forward oracle says of one side (``Megatron``, ``peft``): a weight named by ``megatron``
    (a regex) whose forward adds ``gain`` x its stored adapter's product, with its layer (and expert)."""
    return (
        rf"in flight, {side}: \d+ of \d+ adapted weights add another contribution in the forward pass than their "
        rf"stored adapter's scale \* x A\^T B\^T: .*{megatron}[^(]* \(layer \d+(?: expert \d+)?, gain {gain}"
    )


EXPERTS = r"decoder\.layers\.\d\.mlp\.experts\.\S+\.weight\d* = model\.layers\.\d\.mlp\.experts\.\d+\."
ATTENTION = r"decoder\.layers\.\d\.self_attention\.linear_(?:qkv|proj)\.weight"
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
ADAPTER_FORWARDS = ("ParallelLinearAdapter.forward", "GroupedExpertLinearAdapter.forward",
                    "SharedOuterGroupedExpertAdapter.forward")  # fmt: skip


def _scaled(factor: float, experts: bool) -> tuple[tuple[str, str, Wrap], ...]:
    """Every adapter class's forward scaled (which one a cell uses depends on its spec and mode), the
    merged export hidden: the per-module oracles alone must catch it."""
    wrap = tamper.scale_adapter_forward(factor, experts)
    return (*((PEFT_UTILS, f, wrap) for f in ADAPTER_FORWARDS), WITHOUT_MERGED_EXPORT)


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
        ((DIST_CKPT, "save", tamper.after_checkpoint_saved(tamper.corrupt)),),
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
        ((DIST_CKPT, "load", tamper.perturb_loaded),),
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
        ((DIST_CKPT, "load", tamper.perturb_loaded_on_rank1),),
        (r"rank 1: adapter not restored: \S+adapter\S+ \(chunk 0\): max \|diff\| \d\.\d+e-03, expected bit-exact",),
    ),
    Fault(
        "base_tensor_in_checkpoint",
        "the PEFT filter lets a base-model tensor into the adapter checkpoint",
        "llama",
        "tp=2",
        ((CKPT_FILTER, "apply_peft_adapter_filter_to_state_dict", tamper.filter_keeps_a_base_tensor),),
        (r"rank 0: checkpoint holds \d+ base-model tensors, e\.g\. \['\S+'",),
    ),
    Fault(
        "adapter_left_out_of_checkpoint",
        "the PEFT filter drops the MLP fc1 LoRA-A of every layer from the checkpoint",
        "llama",
        "tp1",
        ((CKPT_FILTER, "apply_peft_adapter_filter_to_state_dict", tamper.filter_drops_fc1_lora_a),),
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
        ((PEFT_UTILS, "load_peft_adapter_checkpoint", tamper.bridge_loader_corrupts),),
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
    # -- faults only the per-module oracles see (the merged export hidden, as before merge_adapter_weights) --
    Fault(
        "expert_forward_scaled",
        "every expert adapter adds 1.3x its delta in Megatron's forward pass only (stored values, export right)",
        "qwen3_moe",
        "tp1",
        _scaled(1.3, experts=True),
        (in_flight("Megatron", EXPERTS, r"1\.(?:29|30)"),),
    ),
    Fault(
        "expert_forward_scaled_2pct",
        "every expert adapter adds 1.02x its delta in Megatron's forward pass only",
        "qwen3_moe",
        "tp1",
        _scaled(1.02, experts=True),
        (in_flight("Megatron", EXPERTS, r"1\.0[12]"),),
    ),
    Fault(
        "attention_forward_scaled_2pct",
        "every attention adapter adds 1.02x its delta in Megatron's forward pass only",
        "llama",
        "tp1",
        _scaled(1.02, experts=False),
        (in_flight("Megatron", ATTENTION, r"1\.0[12]"),),
    ),
    Fault(
        "qkv_export_split_swaps_key_groups",
        "the Megatron -> HF QKV split swaps key groups 0 and 1 (adapter and base exports alike; import right)",
        "llama",
        "tp1",
        (
            (PARAM_MAPPING, "split_qkv_weights", tamper.swap_key_groups),
            (PEFT_BRIDGE, "split_qkv_weights", tamper.swap_key_groups),
            WITHOUT_MERGED_EXPORT,
        ),
        (DELTAS.format(r"\d\.self_attn\.k_proj"),),
    ),
    Fault(
        "module_delta_2pct",
        "layer 2's o_proj delta exported 2% too large",
        "llama",
        "tp1",
        (_export(tamper.delta_two_percent_off), WITHOUT_MERGED_EXPORT),
        (DELTAS.format(r"2\.self_attn\.o_proj"),),
    ),
    Fault(
        "peft_logits_nan",
        "peft's forward returns one NaN logit",
        "llama",
        "tp1",
        (
            ("peft.peft_model", "PeftModel.forward", tamper.nan_in_peft_logits),
            ("peft.peft_model", "PeftModelForCausalLM.forward", tamper.nan_in_peft_logits),
        ),
        (
            LOGITS
            + r" \(\d+\.\d%\) \(1 not finite\); greatest absolute difference: inf at sequence 0, position 3, token 5",
        ),
    ),
    # -- run faults: tests/test_run_faults.py ------------------------------------------------------
    Fault(
        "conversion_raises",
        "HF -> Megatron weight conversion raises an AttributeError (a regression, not a missing component)",
        "llama",
        "tp1",
        ((MODEL_BRIDGE, "MegatronModelBridge.load_weights_hf_to_megatron", disrupt.conversion_raises),),
        (r"^rank 0 raised AttributeError: planted fault", r"in load_weights_hf_to_megatron"),
        kind="run",
        status="error",
        dtypes=("fp32",),
    ),
    Fault(
        "bridge_module_missing",
        "a module inside megatron-bridge fails to import while the model is built (an error, not 'unsupported: "
        "needs the package megatron.bridge.models...')",
        "llama",
        "tp1",
        (
            (
                MODEL_BRIDGE,
                "MegatronModelBridge.load_weights_hf_to_megatron",
                disrupt.raising(disrupt.internal_module_missing),
            ),
        ),
        (
            r"^rank 0 raised ModuleNotFoundError: planted fault: "
            r"No module named 'megatron\.bridge\.models\.planted_missing'",
        ),
        kind="run",
        status="error",
        dtypes=("fp32",),
    ),
    Fault(
        "te_spec_builder_raises",
        "the TE layer spec a family's spec builds on raises a TypeError unrelated to TE being absent (an error, "
        "not 'unsupported: needs transformer_engine')",
        "minimax_m2",
        "tp1",
        ((GPT_SPECS, "get_gpt_layer_with_transformer_engine_spec", disrupt.raising(disrupt.spec_regression)),),
        (r"^rank 0 raised TypeError: planted fault: get_gpt_layer_with_transformer_engine_spec\(\)",),
        kind="run",
        status="error",
        dtypes=("fp32",),
    ),
    Fault(
        "rank1_raises",
        "rank 1 raises in save_hf_adapter",
        "llama",
        "tp=2",
        ((AUTO_BRIDGE, "AutoBridge.save_hf_adapter", disrupt.only_rank(1, disrupt.planted_raise)),),
        (r"rank 1 raised RuntimeError: planted fault", r"Traceback", r"in planted_raise"),
        kind="run",
        status="error",
        dtypes=("fp32",),
    ),
    Fault(
        "rank1_hangs",
        "rank 1 sleeps forever while importing megatron.core (early, so a short timeout still finds it)",
        "llama",
        "tp=2",
        (("megatron.core", "", disrupt.on_import_in_rank(1, disrupt.planted_hang_forever)),),
        (r"timed out after \d+s", r"rank 1 was killed by signal SIGKILL", r"in planted_hang_forever"),
        kind="run",
        status="error",
        timeout=60,
        dtypes=("fp32",),
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
FAULTS += STREAM_FAULTS


def by_name(name: str) -> Fault:
    for fault in FAULTS:
        if fault.name == name:
            return fault
    known = ", ".join(f.name for f in FAULTS)
    raise KeyError(f"unknown fault {name!r} (COMPAT_FAULT); known: {known}")
