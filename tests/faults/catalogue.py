"""The fault catalogue: each fault the harness must catch, planted where it would really happen.

A fault is data: the smallest cell that shows it, the upstream functions it wraps (patched in
every rank right after their module is imported, see ``hook.py``), and the patterns the cell's
``reason`` must contain, in every dtype it runs in (``expect``) and in fp32 alone (``fp32``: where
the fp32 tolerance locates the first divergence). ``COMPAT_FAULT=<name>`` with
``tests/faults/plant`` on PYTHONPATH plants it. Nothing here imports torch or megatron at module
level: the test process reads the catalogue to parametrize, and only the ranks run the wrappers.

Check faults (``kind="check"``) must end the cell ``fail``, in fp32 and in bf16; run faults
(``kind="run"``) break the run itself (a rank raises or hangs, upstream code raises where it used
to be taken for a missing component) and are driven by tests/test_run_faults.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FAULTS", "Fault", "by_name"]

AUTO_BRIDGE = "megatron.bridge.models.conversion.auto_bridge"
PEFT_BRIDGE = "megatron.bridge.models.conversion.peft_bridge"
PARAM_MAPPING = "megatron.bridge.models.conversion.param_mapping"
PEFT_UTILS = "megatron.bridge.peft.utils"
DIST_CKPT = "megatron.core.dist_checkpointing"
CKPT_FILTER = "megatron.bridge.training.checkpointing"
MODEL_BRIDGE = "megatron.bridge.models.conversion.model_bridge"

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]

# What a logits mismatch says (compat/compare.py), with the measured difference and tolerance.
LOGITS = r"Megatron logits differ from peft\.PeftModel logits: mismatched elements: \d+ / \d+"
DIFF = (
    r"greatest absolute difference: \d\.\d+e[-+]\d+ at sequence \d+, position \d+, token \d+ "
    r"\(up to [\d.e-]+ allowed\)"
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
    weights differ in ``modules`` (where the fault is in the adapter export alone), or the logits do."""
    common = (weights_differ(modules),) if modules else (LOGITS, DIFF)
    return {"expect": common, "fp32": (LOGITS, FP32_DIFF, diverges_at(layer, part))}


@dataclass(frozen=True)
class Fault:
    name: str
    about: str
    family: str
    layout: str
    # (module, attribute path inside it, wrapper of the original)
    patches: tuple[tuple[str, str, Wrap], ...]
    expect: tuple[str, ...] = ()  # regexes the reason must match in every dtype (re.search, DOTALL)
    fp32: tuple[str, ...] = ()  # and in fp32 cells
    kind: str = "check"
    status: str = "fail"
    timeout: float | None = None
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.name

    def patterns(self, dtype: str) -> tuple[str, ...]:
        return self.expect + (self.fp32 if dtype == "fp32" else ())


# -- helpers the wrappers share (run inside a rank) ----------------------------------------------
def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def transform_export(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Wrap:
    """Wrap ``AutoBridge.export_adapter_weights``: ``fn`` edits {HF name: tensor} on every rank."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def export_adapter_weights(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            items = list(original(self, *args, **kwargs))
            if not items:
                return iter(items)
            make = type(items[0])
            weights = fn({item.param_name: item.weight for item in items})
            return iter([make(name, tensor) for name, tensor in weights.items()])

        return export_adapter_weights

    return wrap


def after_adapter_saved(fn: Callable[[Path], None]) -> Wrap:
    """Wrap ``AutoBridge.save_hf_adapter``: after it wrote, rank 0 runs ``fn(directory)``."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def save_hf_adapter(self: Any, model: Any, path: Any, *args: Any, **kwargs: Any) -> None:
            original(self, model, path, *args, **kwargs)
            if _rank() == 0:
                fn(Path(path))
            _barrier()

        return save_hf_adapter

    return wrap


def after_checkpoint_saved(fn: Callable[[Path], None]) -> Wrap:
    """Wrap ``dist_checkpointing.save``: once every rank wrote, rank 0 runs ``fn(directory)``."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def save(sharded_state_dict: Any, checkpoint_dir: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(sharded_state_dict, checkpoint_dir, *args, **kwargs)
            _barrier()
            if _rank() == 0:
                fn(Path(checkpoint_dir))
            _barrier()
            return out

        return save

    return wrap


def edit_config(fn: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "adapter_config.json"
        config = json.loads(path.read_text())
        fn(config)
        path.write_text(json.dumps(config, indent=2))

    return edit


def truncate(path_of: Callable[[Path], Path]) -> Callable[[Path], None]:
    def cut(directory: Path) -> None:
        path = path_of(directory)
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)

    return cut


def _layer(name: str, n: int) -> bool:
    return f".layers.{n}." in name


# -- the transformations -------------------------------------------------------------------------
def _swap_qk_rows(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 1: k_proj's lora_B rows exchanged with the first rows of q_proj's (wrong QKV split)."""
    q = next(k for k in w if _layer(k, 1) and k.endswith("q_proj.lora_B.weight"))
    k = q.replace("q_proj", "k_proj")
    rows = w[k].shape[0]
    new_q = w[q].clone()
    new_q[:rows], new_k = w[k], w[q][:rows].clone()
    return {**w, q: new_q, k: new_k}


def _interleave_gqa(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 3: q_proj lora_B rows taken head-major instead of group-major (4 groups x 2 heads)."""
    q = next(k for k in w if _layer(k, 3) and k.endswith("q_proj.lora_B.weight"))
    groups, heads_per_group, head_dim = 4, 2, 8
    b = w[q].reshape(groups, heads_per_group, head_dim, -1).transpose(0, 1).reshape(w[q].shape)
    return {**w, q: b.contiguous()}


def _swap_gate_up(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 2: gate_proj and up_proj lora_B exchanged (wrong fused fc1 split)."""
    gate = next(k for k in w if _layer(k, 2) and k.endswith("gate_proj.lora_B.weight"))
    up = gate.replace("gate_proj", "up_proj")
    return {**w, gate: w[up], up: w[gate]}


def _exchange_ab(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 0 o_proj: lora_A written under lora_B's name and the other way round."""
    a = next(k for k in w if _layer(k, 0) and k.endswith("o_proj.lora_A.weight"))
    b = a.replace("lora_A", "lora_B")
    return {**w, a: w[b], b: w[a]}


def _transpose_ab(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 0 v_proj: lora_A and lora_B written transposed."""
    a = next(k for k in w if _layer(k, 0) and k.endswith("v_proj.lora_A.weight"))
    b = a.replace("lora_A", "lora_B")
    return {**w, a: w[a].t().contiguous(), b: w[b].t().contiguous()}


def _drop_expert(w: dict[str, Any]) -> dict[str, Any]:
    """Expert 2 of every layer: no adapter tensors written."""
    return {k: v for k, v in w.items() if ".experts.2." not in k}


def _duplicate_expert(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 1: expert 1's adapter written again as expert 2's."""
    out = dict(w)
    for k in w:
        if _layer(k, 1) and ".experts.2." in k:
            out[k] = w[k.replace(".experts.2.", ".experts.1.")]
    return out


def _permute_experts(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 0: expert e's adapter written as expert (e + 1) mod 4's."""
    out = dict(w)
    for k in w:
        m = re.search(r"\.experts\.(\d+)\.", k)
        if _layer(k, 0) and m:
            out[k.replace(m.group(0), f".experts.{(int(m.group(1)) + 1) % 4}.")] = w[k]
    return out


def _drop_second_stage(w: dict[str, Any]) -> dict[str, Any]:
    """Layers 2 and 3 (the second of two pipeline stages): nothing exported."""
    return {k: v for k, v in w.items() if not (_layer(k, 2) or _layer(k, 3))}


def _zero_b(w: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in w.items()}


def _zero_adapter_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """``ParallelLinearAdapter.forward`` returns zeros: the Megatron side has no adapter effect."""

    @functools.wraps(original)
    def forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, x, *args, **kwargs) * 0

    return forward


def _reverse_tp_gather(original: Callable[..., Any]) -> Callable[..., Any]:
    """``MegatronParamMapping.gather_from_tp_ranks`` returns the TP shards in reverse order."""

    @functools.wraps(original)
    def gather_from_tp_ranks(self: Any, tensor: Any) -> Any:
        return list(reversed(original(self, tensor)))

    return gather_from_tp_ranks


def _strip_prefix(original: Callable[..., Any]) -> Callable[..., Any]:
    """``convert_adapter_weights_to_peft_state`` writes keys without ``base_model.model.``."""

    @functools.wraps(original)
    def convert(*args: Any, **kwargs: Any) -> Any:
        state, *rest = original(*args, **kwargs)
        return ({k.removeprefix("base_model.model."): v for k, v in state.items()}, *rest)

    return convert


def _orphan_rank_pattern(original: Callable[..., Any]) -> Callable[..., Any]:
    """``infer_rank_pattern_from_adapter_weights`` adds a key for a layer the model lacks."""

    @functools.wraps(original)
    def infer(*args: Any, **kwargs: Any) -> Any:
        return {**original(*args, **kwargs), "model.layers.9.self_attn.q_proj": 4}

    return infer


def _corrupt(directory: Path) -> None:
    """Overwrite the middle quarter of rank 0's shard with bytes of another pattern."""
    path = directory / "__0_0.distcp"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size * 3 // 8)
        f.write(bytes([0x5A]) * (size // 4))


def _first_adapter(section: dict[str, Any]) -> str | None:
    """The first adapter tensor of a loaded state-dict section."""
    return next((k for k in sorted(section) if ".adapter." in k and hasattr(section[k], "add_")), None)


def _perturb_loaded_on_rank1(original: Callable[..., Any]) -> Callable[..., Any]:
    """As ``_perturb_loaded``, on rank 1 alone: the rank that finds the problem is not the one that reports."""
    perturbed = _perturb_loaded(original)

    @functools.wraps(original)
    def load(*args: Any, **kwargs: Any) -> Any:
        return (perturbed if _rank() == 1 else original)(*args, **kwargs)

    return load


def _perturb_loaded(original: Callable[..., Any]) -> Callable[..., Any]:
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


def _filter_keeps_a_base_tensor(original: Callable[..., Any]) -> Callable[..., Any]:
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


def _filter_drops_fc1_lora_a(original: Callable[..., Any]) -> Callable[..., Any]:
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


def _bridge_loader_corrupts(original: Callable[..., Any]) -> Callable[..., Any]:
    """``load_peft_adapter_checkpoint`` leaves one adapter parameter off by 1e-3 after loading."""

    @functools.wraps(original)
    def load(model: list, *args: Any, **kwargs: Any) -> Any:
        out = original(model, *args, **kwargs)
        import torch

        with torch.no_grad():
            next(p for name, p in model[0].named_parameters() if ".adapter." in name).add_(1e-3)
        return out

    return load


def _perturb_when_alone(w: dict[str, Any]) -> dict[str, Any]:
    """In a one-rank launch only (the load of a tp2 -> tp1 cell): layer 3 o_proj's lora_A off by 1e-3."""
    if os.environ.get("WORLD_SIZE") != "1":
        return w
    key = next(k for k in w if _layer(k, 3) and k.endswith("o_proj.lora_A.weight"))
    return {**w, key: w[key] + 1e-3}


def _base_weight_off(original: Callable[..., Any]) -> Callable[..., Any]:
    """HF -> Megatron conversion loads layer 2's MLP output weight off by 0.05 (a conversion bug: the
    adapter and its export are right, the base model is not)."""

    @functools.wraps(original)
    def load_weights_hf_to_megatron(
        self: Any, hf_pretrained: Any, megatron_model: Any, *args: Any, **kwargs: Any
    ) -> Any:
        out = original(self, hf_pretrained, megatron_model, *args, **kwargs)
        import torch

        models = megatron_model if isinstance(megatron_model, list) else [megatron_model]
        with torch.no_grad():
            for chunk in models:
                for name, p in chunk.named_parameters():
                    if "layers.2.mlp.linear_fc2.weight" in name and ".adapter." not in name:
                        p.add_(0.05)
        return out

    return load_weights_hf_to_megatron


def _conversion_raises(original: Callable[..., Any]) -> Callable[..., Any]:
    """HF -> Megatron weight conversion raises, as a conversion regression would."""

    @functools.wraps(original)
    def load_weights_hf_to_megatron(*args: Any, **kwargs: Any) -> Any:
        raise AttributeError("planted fault: 'NoneType' object has no attribute 'megatron_module'")

    return load_weights_hf_to_megatron


# -- run faults ----------------------------------------------------------------------------------
def _only_rank(rank: int, action: Callable[[], None]) -> Wrap:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if int(os.environ.get("RANK", "0")) == rank:
                action()
            return original(*args, **kwargs)

        return wrapper

    return wrap


def _on_import_in_rank(rank: int, action: Callable[[], None]) -> Wrap:
    """Run ``action`` in ``rank`` while the module is being imported (the hook's empty path)."""

    def wrap(module: Any) -> Any:
        if int(os.environ.get("RANK", "-1")) == rank:
            action()
        return module

    return wrap


def planted_raise() -> None:
    raise RuntimeError("planted fault: rank 1 raises in save_hf_adapter")


def planted_hang_forever() -> None:
    while True:
        time.sleep(3600)


def _export(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[str, str, Wrap]:
    return (AUTO_BRIDGE, "AutoBridge.export_adapter_weights", transform_export(fn))


def _saved(fn: Callable[[Path], None]) -> tuple[str, str, Wrap]:
    return (AUTO_BRIDGE, "AutoBridge.save_hf_adapter", after_adapter_saved(fn))


def _config(fn: Callable[[dict[str, Any]], None]) -> tuple[str, str, Wrap]:
    return _saved(edit_config(fn))


FAULTS: tuple[Fault, ...] = (
    Fault(
        "qk_rows_swapped",
        "q and k adapter rows swapped in the fused QKV split (layer 1)",
        "llama",
        "tp1",
        (_export(_swap_qk_rows),),
        **mismatch_at(1, "self_attn", r"1\.self_attn\.[qk]_proj"),
    ),
    Fault(
        "gqa_groups_interleaved",
        "q_proj lora_B rows permuted by head group (layer 3)",
        "llama",
        "tp1",
        (_export(_interleave_gqa),),
        **mismatch_at(3, "self_attn", r"3\.self_attn\.q_proj"),
    ),
    Fault(
        "gate_up_swapped",
        "gate and up swapped in the fused fc1 split (layer 2)",
        "llama",
        "tp1",
        (_export(_swap_gate_up),),
        **mismatch_at(2, "mlp", r"2\.mlp\.(gate|up)_proj"),
    ),
    Fault(
        "lora_ab_exchanged",
        "lora_A and lora_B exchanged (layer 0 o_proj)",
        "llama",
        "tp1",
        (_export(_exchange_ab),),
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
        (_export(_transpose_ab),),
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
        (_export(_drop_expert),),
        (r"the export has no adapter for 12 of the \d+ modules", r"model\.layers\.\{0,1,2,3\}\.mlp\.experts\.\{2\}\."),
    ),
    Fault(
        "expert_duplicated",
        "expert 1's adapter written again as expert 2's (layer 1)",
        "qwen3_moe",
        "tp1",
        (_export(_duplicate_expert),),
        **mismatch_at(1, "mlp", r"1\.mlp\.experts\.2\.(gate|up|down)_proj"),
    ),
    Fault(
        "experts_permuted",
        "expert adapters rotated by one index (layer 0)",
        "qwen3_moe",
        "tp1",
        (_export(_permute_experts),),
        **mismatch_at(0, "mlp", r"0\.mlp\.experts\.\d\.(gate|up|down)_proj"),
    ),
    Fault(
        "tp_shards_reversed",
        "TP shards gathered in the wrong order on export",
        "llama",
        "tp=2",
        ((PARAM_MAPPING, "MegatronParamMapping.gather_from_tp_ranks", _reverse_tp_gather),),
        **mismatch_at(0, "self_attn"),
    ),
    Fault(
        "pp_stage_missing",
        "the second pipeline stage's adapters (layers 2, 3) missing from the export",
        "llama",
        "pp=2",
        (_export(_drop_second_stage),),
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
            (PEFT_UTILS, "ParallelLinearAdapter.forward", _zero_adapter_forward),
            _export(_zero_b),
        ),
        (r"the adapter does not change the logits beyond the tolerance: without it 0 / \d+ \(0\.0%\) logits differ",),
    ),
    Fault(
        "keys_unprefixed",
        "adapter keys written without the base_model.model. prefix",
        "llama",
        "tp1",
        ((PEFT_BRIDGE, "convert_adapter_weights_to_peft_state", _strip_prefix),),
        (r"\d+ of \d+ tensors are not LoRA weight names peft loads \(no 'base_model\.model\.' prefix",),
    ),
    Fault(
        "rank_pattern_orphan",
        "a rank_pattern key in adapter_config.json that matches no module",
        "llama",
        "tp1",
        ((PEFT_BRIDGE, "infer_rank_pattern_from_adapter_weights", _orphan_rank_pattern),),
        (r"rank_pattern key 'model\.layers\.9\.self_attn\.q_proj' matches no module with adapter tensors",),
    ),
    Fault(
        "checkpoint_truncated",
        "a dist checkpoint shard truncated to half its size after saving",
        "llama",
        "tp1",
        ((DIST_CKPT, "save", after_checkpoint_saved(truncate(lambda d: d / "__0_0.distcp"))),),
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
        ((DIST_CKPT, "save", after_checkpoint_saved(_corrupt)),),
        (r"rank 0: cannot load the adapter checkpoint", r"checkpoint/__0_0\.distcp bytes \d+-\d+ \(\S+\) do not load"),
    ),
    Fault(
        "safetensors_truncated",
        "adapter_model.safetensors truncated to half its size after export",
        "llama",
        "tp1",
        (_saved(truncate(lambda d: d / "adapter_model.safetensors")),),
        (r"adapter_model\.safetensors cannot be read",),
    ),
    Fault(
        "loaded_adapter_corrupted",
        "the checkpoint load hands back one adapter tensor off by 1e-3",
        "llama",
        "tp1",
        ((DIST_CKPT, "load", _perturb_loaded),),
        (r"rank 0: adapter not restored: \S+adapter\S+ \(chunk 0\): max \|diff\| \d\.\d+e-03, expected bit-exact",),
    ),
    Fault(
        "loaded_adapter_corrupted_on_rank1",
        "the checkpoint load hands back one adapter tensor off by 1e-3 on rank 1 only",
        "llama",
        "tp=2",
        ((DIST_CKPT, "load", _perturb_loaded_on_rank1),),
        (r"rank 1: adapter not restored: \S+adapter\S+ \(chunk 0\): max \|diff\| \d\.\d+e-03, expected bit-exact",),
    ),
    Fault(
        "base_tensor_in_checkpoint",
        "the PEFT filter lets a base-model tensor into the adapter checkpoint",
        "llama",
        "tp=2",
        ((CKPT_FILTER, "apply_peft_adapter_filter_to_state_dict", _filter_keeps_a_base_tensor),),
        (r"rank 0: checkpoint holds \d+ base-model tensors, e\.g\. \['\S+'",),
    ),
    Fault(
        "adapter_left_out_of_checkpoint",
        "the PEFT filter drops the MLP fc1 LoRA-A of every layer from the checkpoint",
        "llama",
        "tp1",
        ((CKPT_FILTER, "apply_peft_adapter_filter_to_state_dict", _filter_drops_fc1_lora_a),),
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
        ((PEFT_UTILS, "load_peft_adapter_checkpoint", _bridge_loader_corrupts),),
        (r"load_peft_adapter_checkpoint: \S+adapter\S+ \(chunk 0\): max \|diff\| \d\.\d+e-03, expected bit-exact",),
    ),
    Fault(
        "reshard_export_differs",
        "after resharding tp2 -> tp1 the export differs from the one at the save layout",
        "llama",
        "tp=2:tp1",
        (_export(_perturb_when_alone),),
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
        ((MODEL_BRIDGE, "MegatronModelBridge.load_weights_hf_to_megatron", _base_weight_off),),
        (
            r"the base models differ before any adapter: Megatron with its adapters off vs the HF model: "
            r"mismatched elements: \d+ / \d+",
        ),
    ),
    # -- run faults: tests/test_run_faults.py ------------------------------------------------------
    Fault(
        "conversion_raises",
        "HF -> Megatron weight conversion raises an AttributeError (a regression, not a missing component)",
        "llama",
        "tp1",
        ((MODEL_BRIDGE, "MegatronModelBridge.load_weights_hf_to_megatron", _conversion_raises),),
        (r"^rank 0 raised AttributeError: planted fault", r"in load_weights_hf_to_megatron"),
        kind="run",
        status="error",
        dtypes=("fp32",),
    ),
    Fault(
        "rank1_raises",
        "rank 1 raises in save_hf_adapter",
        "llama",
        "tp=2",
        ((AUTO_BRIDGE, "AutoBridge.save_hf_adapter", _only_rank(1, planted_raise)),),
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
        (("megatron.core", "", _on_import_in_rank(1, planted_hang_forever)),),
        (r"timed out after \d+s", r"rank 1 was killed by signal SIGKILL", r"in planted_hang_forever"),
        kind="run",
        status="error",
        timeout=60,
        dtypes=("fp32",),
    ),
)


def by_name(name: str) -> Fault:
    for fault in FAULTS:
        if fault.name == name:
            return fault
    known = ", ".join(f.name for f in FAULTS)
    raise KeyError(f"unknown fault {name!r} (COMPAT_FAULT); known: {known}")
