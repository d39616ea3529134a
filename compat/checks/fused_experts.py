"""The export's per-expert LoRA tensors against what peft made of them in fused expert parameters.

transformers 5 fuses a MoE layer's experts into 3-D parameters (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``) and peft converts the file's per-expert pairs (``mlp.experts.3.down_proj.
lora_A.weight``) into one ParamWrapper per parameter: no parameter carries the file's name, so a
check by name cannot see them. Each expert's delta ``B @ A`` from the file is compared with the
slice peft's fused weights give, laid out as ``ParamWrapper.get_delta_weight`` reads them
(``peft/tuners/lora/layer.py:2552-2557``, peft 0.21.2): a value peft placed under another
expert, another projection or another half of ``gate_up_proj`` is located.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["fused_expert_problems"]

_PREFIX = "base_model.model."
# The checkpoint projections fused into a transformers experts parameter, in their order along its rows.
_SOURCES = {"gate_up_proj": ("gate_proj", "up_proj")}
# Both sides are the same stored values multiplied in float64: only the summation order differs.
_RTOL = 1e-9


def fused_expert_problems(
    peft_model: Any, saved: dict[str, Any], adapter: str = "default"
) -> tuple[list[str], set[str]]:
    """Problems of the fused experts peft built, and the file keys they account for."""
    import torch

    problems: list[str] = []
    seen: set[str] = set()
    for name, module in peft_model.named_modules():
        if not hasattr(module, "parameter_name") or adapter not in getattr(module, "lora_A", {}):
            continue
        parent = re.sub(r"(\.base_layer)+$", "", name).removeprefix(_PREFIX)
        param, n = f"{parent}.{module.parameter_name}", module.num_experts
        sources = _SOURCES.get(module.parameter_name, (module.parameter_name,))
        keys = {
            (e, s, kind): f"{_PREFIX}{parent}.{e}.{s}.{kind}.weight"
            for e in range(n)
            for s in sources
            for kind in ("lora_A", "lora_B")
        }
        present = {k for k in keys.values() if k in saved}
        if not present:
            continue  # the file names this parameter itself (ParamWrapper form): compared by name
        seen |= present
        if len(present) < len(keys):
            missing = sorted(set(keys.values()) - present)
            problems.append(
                f"{param} is fused from {n} experts x {list(sources)}, but the file has {len(present)} of their "
                f"{len(keys)} LoRA tensors (peft converts none of a parameter's experts then), "
                f"e.g. missing {missing[:2]}"
            )
            continue
        a, b = module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()
        held = torch.einsum(
            "ore,eri->eoi", b.double().cpu().reshape(b.shape[0], -1, n), a.double().cpu().reshape(n, -1, a.shape[-1])
        )
        differ = []
        for e in range(n):
            row = 0
            for s in sources:
                want = (
                    saved[keys[e, s, "lora_B"]].to(b.dtype).double() @ saved[keys[e, s, "lora_A"]].to(a.dtype).double()
                )
                got = held[e, row : row + want.shape[0]]
                row += want.shape[0]
                off = _mismatch(got, want)
                if off:
                    differ.append(f"expert {e} {s} ({off}, file delta {tuple(want.shape)})")
        if differ:
            problems.append(
                f"peft's fused {param} holds other values than the file's per-expert tensors for {len(differ)} of "
                f"{n * len(sources)} expert slices, e.g. {'; '.join(differ[:3])}"
            )
    return problems, seen


def _mismatch(got: Any, want: Any) -> str:
    """How peft's slice differs from the file's delta, or "" when it holds it."""
    import torch

    if got.shape != want.shape:
        return f"peft's slice has shape {tuple(got.shape)}"
    if torch.allclose(got, want, rtol=_RTOL, atol=_RTOL * float(want.abs().max())):
        return ""
    return f"max |diff| {(got - want).abs().max():.3e}"
