"""How faults are planted: wrappers around upstream functions and the edits they make.

Everything here runs inside a rank (``hook.py`` applies the wrappers right after their module is
imported); torch and megatron are imported inside the functions, so the test process can read the
catalogue without them. ``catalogue.py`` says which fault uses which of these.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


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


def add_base_weight(directory: Path) -> None:
    """The base model's ``embed_tokens`` written, unchanged, into the adapter file: peft loads it
    without a warning (it is not an unexpected key), and the logits cannot tell."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base = Path(json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"])
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                tensors["base_model.model.model.embed_tokens.weight"] = f.get_tensor("model.embed_tokens.weight")
    save_file(tensors, weights, metadata={"format": "pt"})


def _layer(name: str, n: int) -> bool:
    return f".layers.{n}." in name


# -- the transformations -------------------------------------------------------------------------
def swap_qk_rows(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 1: k_proj's lora_B rows exchanged with the first rows of q_proj's (wrong QKV split)."""
    q = next(k for k in w if _layer(k, 1) and k.endswith("q_proj.lora_B.weight"))
    k = q.replace("q_proj", "k_proj")
    rows = w[k].shape[0]
    new_q = w[q].clone()
    new_q[:rows], new_k = w[k], w[q][:rows].clone()
    return {**w, q: new_q, k: new_k}


def interleave_gqa(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 3: q_proj lora_B rows taken head-major instead of group-major (4 groups x 2 heads)."""
    q = next(k for k in w if _layer(k, 3) and k.endswith("q_proj.lora_B.weight"))
    groups, heads_per_group, head_dim = 4, 2, 8
    b = w[q].reshape(groups, heads_per_group, head_dim, -1).transpose(0, 1).reshape(w[q].shape)
    return {**w, q: b.contiguous()}


def swap_gate_up(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 2: gate_proj and up_proj lora_B exchanged (wrong fused fc1 split)."""
    gate = next(k for k in w if _layer(k, 2) and k.endswith("gate_proj.lora_B.weight"))
    up = gate.replace("gate_proj", "up_proj")
    return {**w, gate: w[up], up: w[gate]}


def exchange_ab(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 0 o_proj: lora_A written under lora_B's name and the other way round."""
    a = next(k for k in w if _layer(k, 0) and k.endswith("o_proj.lora_A.weight"))
    b = a.replace("lora_A", "lora_B")
    return {**w, a: w[b], b: w[a]}


def transpose_ab(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 0 v_proj: lora_A and lora_B written transposed."""
    a = next(k for k in w if _layer(k, 0) and k.endswith("v_proj.lora_A.weight"))
    b = a.replace("lora_A", "lora_B")
    return {**w, a: w[a].t().contiguous(), b: w[b].t().contiguous()}


def reverse_q_when_not_hidden(original: Callable[..., Any]) -> Callable[..., Any]:
    """Layer 0 q_proj lora_B rows reversed in the export, only where the model's heads x head_dim != hidden
    (read from the bridge's HF config, whatever the layout): a shape-only bug, invisible at 8 x 8 = 64."""

    def reverse(w: dict[str, Any]) -> dict[str, Any]:
        b = next(k for k in w if _layer(k, 0) and k.endswith("q_proj.lora_B.weight"))
        return {**w, b: w[b].flip(0).contiguous()}

    flipped = transform_export(reverse)(original)

    @functools.wraps(original)
    def export_adapter_weights(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        c = getattr(self.hf_pretrained, "config", self.hf_pretrained)
        if c.num_attention_heads * c.head_dim == c.hidden_size:
            return original(self, *args, **kwargs)
        return flipped(self, *args, **kwargs)

    return export_adapter_weights


def drop_expert(w: dict[str, Any]) -> dict[str, Any]:
    """Expert 2 of every layer: no adapter tensors written."""
    return {k: v for k, v in w.items() if ".experts.2." not in k}


def drop_expert_1(w: dict[str, Any]) -> dict[str, Any]:
    """Expert 1 of every layer: no adapter tensors written."""
    return {k: v for k, v in w.items() if ".experts.1." not in k}


def duplicate_expert(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 1: expert 1's adapter written again as expert 2's."""
    out = dict(w)
    for k in w:
        if _layer(k, 1) and ".experts.2." in k:
            out[k] = w[k.replace(".experts.2.", ".experts.1.")]
    return out


def permute_experts(w: dict[str, Any]) -> dict[str, Any]:
    """Layer 0: expert e's adapter written as expert (e + 1) mod 4's."""
    out = dict(w)
    for k in w:
        m = re.search(r"\.experts\.(\d+)\.", k)
        if _layer(k, 0) and m:
            out[k.replace(m.group(0), f".experts.{(int(m.group(1)) + 1) % 4}.")] = w[k]
    return out


def drop_second_stage(w: dict[str, Any]) -> dict[str, Any]:
    """Layers 2 and 3 (the second of two pipeline stages): nothing exported."""
    return {k: v for k, v in w.items() if not (_layer(k, 2) or _layer(k, 3))}


def zero_b(w: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in w.items()}


def zero_adapter_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """``ParallelLinearAdapter.forward`` returns zeros: the Megatron side has no adapter effect."""

    @functools.wraps(original)
    def forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        return original(self, x, *args, **kwargs) * 0

    return forward


def reverse_tp_gather(original: Callable[..., Any]) -> Callable[..., Any]:
    """``MegatronParamMapping.gather_from_tp_ranks`` returns the TP shards in reverse order."""

    @functools.wraps(original)
    def gather_from_tp_ranks(self: Any, tensor: Any) -> Any:
        return list(reversed(original(self, tensor)))

    return gather_from_tp_ranks


def strip_prefix(original: Callable[..., Any]) -> Callable[..., Any]:
    """``convert_adapter_weights_to_peft_state`` writes keys without ``base_model.model.``."""

    @functools.wraps(original)
    def convert(*args: Any, **kwargs: Any) -> Any:
        state, *rest = original(*args, **kwargs)
        return ({k.removeprefix("base_model.model."): v for k, v in state.items()}, *rest)

    return convert


def orphan_rank_pattern(original: Callable[..., Any]) -> Callable[..., Any]:
    """``infer_rank_pattern_from_adapter_weights`` adds a key for a layer the model lacks."""

    @functools.wraps(original)
    def infer(*args: Any, **kwargs: Any) -> Any:
        return {**original(*args, **kwargs), "model.layers.9.self_attn.q_proj": 4}

    return infer


def perturb_when_alone(w: dict[str, Any]) -> dict[str, Any]:
    """In a one-rank launch only (the load of a tp2 -> tp1 cell): layer 3 o_proj's lora_A off by 1e-3."""
    if os.environ.get("WORLD_SIZE") != "1":
        return w
    key = next(k for k in w if _layer(k, 3) and k.endswith("o_proj.lora_A.weight"))
    return {**w, key: w[key] + 1e-3}


def _after_load(original: Callable[..., Any], edit: Callable[[str, Any], None]) -> Callable[..., Any]:
    """The HF -> Megatron weight load, then ``edit(name, param)`` on every Megatron parameter (no grad)."""

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
                    edit(name, p)
        return out

    return load_weights_hf_to_megatron


def base_weight_off(original: Callable[..., Any]) -> Callable[..., Any]:
    """HF -> Megatron conversion loads layer 2's MLP output weight off by 0.05 (a conversion bug: the
    adapter and its export are right, the base model is not)."""

    def edit(name: str, p: Any) -> None:
        if "layers.2.mlp.linear_fc2.weight" in name and ".adapter." not in name:
            p.add_(0.05)

    return _after_load(original, edit)


def router_rows_swapped(original: Callable[..., Any]) -> Callable[..., Any]:
    """HF -> Megatron conversion loads layer 1's router with experts 0 and 1 swapped (a wrong router:
    the experts and the adapter are right, the tokens go elsewhere, and each flip lies exactly within
    twice its own router-logit drift)."""

    def edit(name: str, p: Any) -> None:
        if "layers.1.mlp.router.weight" in name:
            p.copy_(p[[1, 0, *range(2, p.shape[0])]])

    return _after_load(original, edit)


def merge_in_place_raises_on_rank1(original: Callable[..., Any]) -> Callable[..., Any]:
    """``LoRAMerge.merge`` raises on rank 1 when ``LoRALinear.weight`` calls it (Megatron merging in
    place), as it does for MLA's duplicated q down projection at TP2 under TE; rank 0 goes on into
    the merge's all-gather."""

    @functools.wraps(original)
    def merge(self: Any, base_weight: Any, *args: Any, **kwargs: Any) -> Any:
        import sys

        if _rank() == 1 and sys._getframe(1).f_code.co_name == "weight":
            rows = base_weight.shape[0]
            raise RuntimeError(
                f"planted fault: The size of tensor a ({rows}) must match the size of tensor b ({rows // 2})"
            )
        return original(self, base_weight, *args, **kwargs)

    return merge


def rotate_q_heads(original: Callable[..., Any]) -> Callable[..., Any]:
    """``AutoBridge.export_adapter_weights``: layer 1's q_proj lora_B rows rolled by one head (a wrong QKV
    split); the head size is read from the bridge's HF config, so the fault is the same at any width."""

    @functools.wraps(original)
    def export_adapter_weights(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(original(self, *args, **kwargs))
        config = self.hf_pretrained.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        out = []
        for item in items:
            w = item.weight
            if _layer(item.param_name, 1) and item.param_name.endswith("q_proj.lora_B.weight"):
                w = w.roll(head_dim, dims=0)
            out.append(type(item)(item.param_name, w))
        return iter(out)

    return export_adapter_weights


def without_merged_export(original: Callable[..., Any]) -> Callable[..., Any]:
    """``AutoBridge.save_hf_weights`` as in releases before ``merge_adapter_weights``: the harness then
    skips the bridge's merged export, and with it the per-tensor merged-weight check."""

    def save_hf_weights(self: Any, model: Any, path: Any, show_progress: bool = True) -> Any:
        return original(self, model, path, show_progress=show_progress, merge_adapter_weights=False)

    return save_hf_weights  # no functools.wraps: inspect.signature must not see the original's parameters


def load_bumps_a_base_weight(original: Callable[..., Any]) -> Callable[..., Any]:
    """Loading a state dict into a Megatron model also moves its first base weight by 1e-3 (a loader that
    writes into the base: what the base snapshot taken before the adapter load must catch)."""
    import torch

    @functools.wraps(original)
    def load_state_dict(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if hasattr(self, "decoder"):  # the GPT model, not an HF one
            with torch.no_grad():
                next(p for n, p in self.named_parameters() if ".adapter." not in n).add_(1e-3)
        return out

    return load_state_dict
