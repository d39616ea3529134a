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

from compat.checks.adapter_names import PREFIX
from compat.checks.problems import Listed

__all__ = ["fused_expert_problems"]

# The checkpoint projections fused into a transformers experts parameter, in their order along its rows: the
# Qwen/DeepSeek names, or Mixtral's and MiniMax's w1 (gate), w3 (up) and w2 (down) (transformers'
# conversion_mapping.py fuses w1 and w3 into gate_up_proj in that order). The file's own names say which.
_SOURCES = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}
# Both sides are the same stored values multiplied in float64: only the summation order differs.
_RTOL = 1e-9


def fused_expert_problems(
    peft_model: Any, saved: dict[str, Any], adapter: str = "default"
) -> tuple[list[Listed], set[str]]:
    """Problems of the fused experts peft built, and the file keys they account for."""
    problems: list[Listed] = []
    seen: set[str] = set()
    for name, module in peft_model.named_modules():
        if not hasattr(module, "parameter_name") or adapter not in getattr(module, "lora_A", {}):
            continue
        parent = re.sub(r"(\.base_layer)+$", "", name).removeprefix(PREFIX)
        param, n = f"{parent}.{module.parameter_name}", module.num_experts
        keys, sources = _file_keys(saved, parent, module.parameter_name, n)
        present = {k for k in keys.values() if k in saved}
        if not present:
            continue  # the file names this parameter itself (ParamWrapper form): compared by name
        seen |= present
        if len(present) < len(keys):
            missing = sorted(set(keys.values()) - present)
            problems.append(
                Listed(
                    f"{param} is fused from {n} experts x {list(sources)}, but the file has {len(present)} of their "
                    f"{len(keys)} LoRA tensors (peft converts none of a parameter's experts then), "
                    f"e.g. missing {missing[:2]}",
                    missing,
                )
            )
            continue
        a, b = module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach()
        differ = _differing_experts(a, b, saved, keys, n, sources)
        if differ:
            problems.append(
                Listed(
                    f"peft's fused {param} holds other values than the file's per-expert tensors for {len(differ)} of "
                    f"{n * len(sources)} expert slices, e.g. {'; '.join(text for _, text in differ[:3])}",
                    [f"{parent}.{slice_}" for slice_, _ in differ],
                )
            )
    return problems, seen


def _file_keys(
    saved: dict[str, Any], parent: str, parameter: str, n: int
) -> tuple[dict[tuple[int, str, str], str], tuple[str, ...]]:
    """The file keys of a fused parameter's experts, under whichever of its source names the file uses."""
    candidates = _SOURCES.get(parameter, ((parameter,),))
    best: tuple[dict[tuple[int, str, str], str], tuple[str, ...]] = ({}, candidates[0])
    for owner in _file_parents(saved, parent):
        for sources in candidates:
            keys = {
                (e, src, kind): f"{PREFIX}{owner}.{e}.{src}.{kind}.weight"
                for e in range(n)
                for src in sources
                for kind in ("lora_A", "lora_B")
            }
            if any(k in saved for k in keys.values()):
                return keys, sources
            best = best if best[0] else (keys, sources)
    return best


def _file_parents(saved: dict[str, Any], parent: str) -> list[str]:
    """The experts module as the file may name it: the model's name, then the file's experts module of the same
    layer where transformers renamed the block on load (Mixtral's and MiniMax's checkpoint ``block_sparse_moe``
    is the model's ``mlp``: transformers 5.12 ``conversion_mapping.py:797``); a layer holds one experts module."""
    m = re.fullmatch(r"(.*\.layers\.\d+)\.[^.]+\.experts", parent)
    if not m:
        return [parent]
    block = re.compile(rf"{re.escape(PREFIX + m[1])}\.([^.]+)\.experts\.\d+\.")
    named = sorted({b[1] for k in saved if (b := block.match(k))})
    return [parent, *(f"{m[1]}.{b}.experts" for b in named if f"{m[1]}.{b}.experts" != parent)]


def _differing_experts(
    a: Any, b: Any, saved: dict[str, Any], keys: dict[tuple[int, str, str], str], n: int, sources: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(``E.gate_proj``, ``expert E gate_proj (max |diff| ..., file delta (rows, cols))``) for each slice peft
    holds otherwise: the slice as the checkpoint names its module under the experts, and what differs.

    Freivalds' check: each expert's delta, peft's and the file's, is applied to the same random
    probes through its own factors, ``B @ (A @ v)``, in float64 on the device peft's weights are on.
    Two deltas that differ beyond rounding give other products with probability 1, and the products
    cost the factors' size, not the deltas' (at 32 experts of Qwen3-30B-A3B widths the deltas are
    100M values a parameter: seconds per layer on a host, issue 19). A slice found to differ is then
    measured whole, for its message.
    """
    import torch

    probes = torch.randn(a.shape[-1], _PROBES, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a3, b3 = a.double().reshape(n, -1, a.shape[-1]), b.double().reshape(b.shape[0], -1, n)
    probes = probes.to(a3.device)
    held = torch.einsum("ore,erk->eok", b3, a3 @ probes)  # [e, rows, probes]
    differ, row = [], 0
    for s in sources:
        pair = {k: torch.stack([saved[keys[e, s, k]] for e in range(n)]) for k in ("lora_A", "lora_B")}
        fa, fb = pair["lora_A"].to(a.dtype).to(a3), pair["lora_B"].to(b.dtype).to(a3)
        want = fb @ (fa @ probes)  # [e, rows, probes]
        rows = slice(row, row + want.shape[1])
        got = held[:, rows]
        row = rows.stop
        if got.shape != want.shape:
            shape = tuple(got.shape[1:])
            differ += [(f"{e}.{s}", f"expert {e} {s} (peft's slice has shape {shape})") for e in range(n)]
            continue
        scale = want.abs().amax(dim=(1, 2), keepdim=True)
        off = ((got - want).abs() > _RTOL * scale + _RTOL * want.abs()).flatten(1).any(1)
        for e in off.nonzero().flatten().tolist():
            worst = (b3[rows, :, e] @ a3[e] - fb[e] @ fa[e]).abs().max()
            text = f"expert {e} {s} (max |diff| {float(worst):.3e}, file delta {(fb.shape[1], fa.shape[2])})"
            differ.append((f"{e}.{s}", text))
    return sorted(differ, key=lambda d: int(d[0].split(".")[0]))


_PROBES = 2  # random vectors per check: one already finds a differing delta with probability 1
