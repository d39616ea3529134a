"""Megatron's adapted weights, one per base weight a LoRA wrapper adapts, with their stored factors.

Both oracles judge Megatron against what its adapter *stores*: the at-rest oracle the delta these
factors make (``compat.rank.delta_oracle``), the forward oracle what the forward pass adds to the
base output (``compat.rank.forward_oracle``). Each adapted weight is named as the bridge's
conversion task names it (global layer and expert numbers) with the HF weights it maps to, so a
finding reads the same on every rank and layout, and coverage is counted per HF weight.

A weight's delta is ``sum over branches of scale * B @ A`` placed at the branch's rows of the
local base weight: one branch for LoRA, q/k/v or gate/up for the bridge's canonical LoRA (placed
in Megatron's fused layout, written out here from megatron-core's definition, not taken from
the bridge), each local expert's slice for grouped-GEMM experts. The factors are this rank's,
gathered over the adapter's tensor-parallel group where the adapter splits them (as the bridge's
``LoRAMerge`` does), so ``X @ delta.T`` is what this rank's local GEMM adds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["AdaptedWeight", "Branch", "adapted_weights", "unjudged_wrappers"]


@dataclass
class Branch:
    """One low-rank product of a weight: ``scale * b @ a`` at ``rows`` of the local weight (None: all)."""

    a: torch.Tensor  # [r, in_local], fp32
    b: torch.Tensor  # [rows, r], fp32
    scale: float
    rows: torch.Tensor | None = None


@dataclass
class AdaptedWeight:
    """A local base weight and what its adapter stores for it."""

    name: str  # the conversion task's global Megatron name, e.g. decoder.layers.1.mlp.experts.linear_fc1.weight3
    hf: tuple[str, ...]  # the HF weights it maps to
    layer: int | None
    expert: int | None  # global expert number, for expert weights
    wrapper: Any
    weight: torch.Tensor  # the local base weight
    local_expert: int | None  # which of the wrapper's grouped GEMMs (TE grouped experts)
    branches: list[Branch] = field(default_factory=list)
    magnitude: torch.Tensor | None = None  # DoRA: the stored per-row magnitude (local rows)
    kind: str = "lora"  # lora, canonical, dora
    row_parallel: bool = False  # the base weight splits its input over ``group``
    reduced: bool = False  # ... and the base output is summed over it (not: experts' explicit comm)
    group: Any = None  # the tensor-parallel group the base weight is split over
    mapping: Any = None  # the bridge's param mapping of the base weight (its import conversion)
    module: Any = None  # the Megatron module the mapping converts for

    def delta(self) -> torch.Tensor:
        """This rank's fp32 delta, shaped like the local base weight."""
        out = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        for br in self.branches:
            d = br.scale * (br.b @ br.a)
            if br.rows is None:
                out += d
            else:
                out[br.rows] += d
        return out

    def where(self) -> str:
        """``layer 1 expert 2`` (what a finding names besides the weight)."""
        parts = ([f"layer {self.layer}"] if self.layer is not None else []) + (
            [f"expert {self.expert}"] if self.expert is not None else []
        )
        return " ".join(parts)


def _wrappers(model: list) -> list[tuple[str, Any]]:
    return [
        (n, m) for chunk in model for n, m in chunk.named_modules() if hasattr(m, "adapter") and hasattr(m, "to_wrap")
    ]


def unjudged_wrappers(model: list) -> dict[str, str]:
    """Wrappers no oracle can judge here, by module name, with why (their maths is not known here)."""
    out = {}
    for name, m in _wrappers(model):
        why = _unknown(m)
        if why:
            out[re.sub(r"^(module\.)+", "", name)] = why
    return out


def _unknown(m: Any) -> str:
    kind = type(m).__name__
    if kind == "TEFusedLoRALinear":
        return "TE's op fuser computes the adapter inside fused ops: no input or output of it is visible"
    if kind not in ("LoRALinear", "LoRALinearSplitQKV", "LoRALinearSplitFC1UpGate", "DoRALinear"):
        return f"{kind}: the harness knows no maths for this adapter wrapper"
    return ""


def adapted_weights(bridge: Any, model: list) -> list[AdaptedWeight]:
    """Collective over the adapters' TP groups: every adapted weight of this rank, in model order."""
    tasks = {
        id(t.param_weight): t
        for t in bridge.get_conversion_tasks(model)
        if t is not None and t.param_weight is not None
    }
    out = []
    for _, m in _wrappers(model):
        if _unknown(m):
            continue
        base = m.to_wrap
        locals_: list[tuple[int | None, torch.Tensor]]
        if hasattr(base, "weight"):
            locals_ = [(None, base.weight)]
        else:  # TE grouped experts: weight0..weightN-1
            locals_ = [(i, getattr(base, f"weight{i}")) for i in range(base.num_gemms)]
        for i, w in locals_:
            task = tasks.get(id(w))
            if task is None:
                continue
            out.append(_weight(m, w, i, task))
    return out


def _hf_names(mapping: Any) -> tuple[str, ...]:
    hf = mapping.hf_param
    return (hf,) if isinstance(hf, str) else tuple(hf.values())


def _weight(m: Any, w: torch.Tensor, i: int | None, task: Any) -> AdaptedWeight:
    name = task.global_param_name
    layer = re.search(r"\blayers\.(\d+)\.", name)
    expert = re.search(r"(?:local_experts\.(\d+)\.|\.weight(\d+)$)", name)
    out = AdaptedWeight(
        name=re.sub(r"\.to_wrap(?=\.)", "", name),
        hf=_hf_names(task.mapping),
        layer=int(layer.group(1)) if layer else None,
        expert=int(next(g for g in expert.groups() if g is not None)) if expert else None,
        wrapper=m,
        weight=w,
        local_expert=i,
        mapping=task.mapping,
        module=task.megatron_module,
    )
    group = _base_group(m)
    size = _size(group)
    out.group = group
    out.row_parallel = size > 1 and _row_parallel(m.to_wrap, w)
    out.reduced = (
        out.row_parallel
        and not getattr(m.to_wrap, "explicit_expert_comm", False)
        and (getattr(m.to_wrap, "parallel_mode", "row") == "row")
    )
    kind = type(m).__name__
    if kind == "LoRALinearSplitQKV":
        out.kind = "canonical"
        rows = _qkv_rows(m.to_wrap.config, size, w.shape[0])
        out.branches = [_branch(getattr(m.adapter, f"adapter_{p}"), rows[p].numel(), i, rows[p]) for p in "qkv"]
    elif kind == "LoRALinearSplitFC1UpGate":
        out.kind = "canonical"
        half = w.shape[0] // 2
        gate, up = torch.arange(half), torch.arange(half, 2 * half)
        out.branches = [_branch(m.adapter.adapter_gate, half, i, gate), _branch(m.adapter.adapter_up, half, i, up)]
    else:
        out.branches = [_branch(m.adapter, w.shape[0], i, None)]
        if kind == "DoRALinear":
            out.kind = "dora"
            out.magnitude = m.adapter.get_weight_magnitude().detach().float()
    return out


def _row_parallel(base: Any, w: torch.Tensor) -> bool:
    """Whether the base linear splits its input over its group, as megatron-core builds it: TE's parallel mode,
    else the class (local and TE linears are named Row/ColumnParallel...), else the weight's own marks
    (``partition_dim``, which megatron-core 0.17 leaves at -1 on weights the bridge 0.4 re-wraps)."""
    mode = getattr(base, "parallel_mode", None)
    if mode in ("row", "column"):
        return bool(mode == "row")
    name = type(base).__name__
    if "RowParallel" in name or "ColumnParallel" in name:
        return "RowParallel" in name
    return getattr(w, "partition_dim", 0) == 1 and bool(getattr(w, "tensor_model_parallel", False))


def _qkv_rows(config: Any, tp: int, rows: int) -> dict[str, torch.Tensor]:
    """Where q, k and v sit in Megatron's fused QKV weight on one TP rank: per local query group,
    its heads' query rows, then one key head, then one value head (megatron/core/transformer/
    attention.py, ``SelfAttention.get_query_key_value_tensors``: the [ng, (np/ng + 2) * hn] view)."""
    heads, groups = config.num_attention_heads // tp, config.num_query_groups // tp
    d = config.kv_channels
    per = heads // groups
    if groups * (per + 2) * d != rows:
        raise ValueError(f"fused QKV rows {rows} are not {groups} groups x ({per} + 2) heads x {d}")
    q, k, v = [], [], []
    for g in range(groups):
        start = g * (per + 2) * d
        q.append(torch.arange(start, start + per * d))
        k.append(torch.arange(start + per * d, start + (per + 1) * d))
        v.append(torch.arange(start + (per + 1) * d, start + (per + 2) * d))
    return {"q": torch.cat(q), "k": torch.cat(k), "v": torch.cat(v)}


def _branch(adapter: Any, out_rows: int, i: int | None, rows: torch.Tensor | None) -> Branch:
    """The adapter's factors for this rank's GEMM, gathered over its TP group where it splits them."""
    lin, lout = adapter.linear_in.weight.detach().float(), adapter.linear_out.weight.detach().float()
    if i is not None:
        lin, lout = (lin[i] if lin.dim() == 3 else lin), (lout[i] if lout.dim() == 3 else lout)
    group = getattr(adapter, "expert_tp_group", None) or getattr(adapter, "tp_group", None)
    if group is None and not hasattr(adapter, "tp_group"):  # 0.4.x: parallel state's
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    size = _size(group)
    if size > 1 and lin.shape[0] * size == adapter.dim and lout.shape[1] == adapter.dim:
        lin = torch.cat(_gather(lin, group, size), dim=0)  # the rank is split: gathered like LoRAMerge
    elif size > 1 and lout.shape[0] * size == out_rows:
        lout = torch.cat(_gather(lout, group, size), dim=0)  # the outputs are split
    return Branch(lin, lout, adapter.alpha / adapter.dim, rows.to(lin.device) if rows is not None else None)


def _base_group(m: Any) -> Any:
    """The group the base linear is split over: its own (Megatron's and TE's linears keep it), else its adapter's."""
    if getattr(m.to_wrap, "tp_group", None) is not None:
        return m.to_wrap.tp_group
    a = m.adapter
    for holder in (a, getattr(a, "adapter_q", None), getattr(a, "adapter_gate", None)):
        if holder is not None and (getattr(holder, "expert_tp_group", None) or getattr(holder, "tp_group", None)):
            return getattr(holder, "expert_tp_group", None) or holder.tp_group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


def _size(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _gather(t: torch.Tensor, group: Any, size: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts
