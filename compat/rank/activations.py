"""Forward passes of both sides, and where their activations first diverge.

The same inputs go through Megatron (logits gathered over TP, vocab padding cut) and through the
HF model; per-layer outputs of the attention block, the MLP and the layer are kept on both sides,
so a logits mismatch names the first layer and sub-module where the two disagree.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from compat.checks.compare import Tolerance, compare
from compat.rank.backends import Backend
from compat.rank.model_build import unwrap
from compat.rank.paths import CellPaths
from compat.rank.routing import megatron_router_hook

__all__ = [
    "SEQUENCES",
    "TOKENS",
    "capture_hf",
    "first_divergence",
    "input_ids",
    "load_megatron",
    "megatron_forward",
]

SEQUENCES, TOKENS = 8, 16  # eight sequences: routing flips at real widths leave enough positions (MIN_POSITIONS)
_PARTS = ("self_attn", "mlp", "output")


def input_ids(vocab_size: int, device: Any = "cpu") -> torch.Tensor:
    """The same seeded token ids on every rank and on the HF side."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (SEQUENCES, TOKENS), generator=g).to(device)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _capture_megatron(model: list, store: dict[str, torch.Tensor]) -> list[Any]:
    hooks = []
    for chunk in model:
        for layer in unwrap(chunk).decoder.layers:
            n = layer.layer_number - 1  # Megatron numbers layers from 1, globally
            for part, module in (("self_attn", layer.self_attention), ("mlp", layer.mlp), ("output", layer)):

                def hook(_m: Any, _i: Any, out: Any, key: str = f"layer {n} {part}") -> None:
                    # A copy: in inference the bias-dropout-add adds the residual in place into
                    # this very tensor (megatron/core/fusions/fused_bias_dropout.py:49, 0.19.2).
                    store[key] = _first(out).clone()  # [s, b, h]; [s / tp, b, h] under SP

                hooks.append(module.register_forward_hook(hook))
            router = getattr(layer.mlp, "router", None)  # MoE layers: each token's experts (compat.rank.routing)
            if router is not None:
                hooks.append(router.register_forward_hook(megatron_router_hook(store, n)))
    return hooks


def megatron_forward(
    model: list, backend: Backend, hidden_size: int, vocab_size: int, paths: CellPaths, tag: str
) -> None:
    """Run the model; the first TP/DP rank of each pipeline stage writes its stage's activations."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region,
        gather_from_tensor_model_parallel_region,
    )

    activations: dict[str, torch.Tensor] = {}
    hooks = _capture_megatron(model, activations)
    try:
        with torch.no_grad():
            out = backend.forward(model, input_ids(vocab_size, backend.device), hidden_size)
    finally:
        for h in hooks:
            h.remove()
    if unwrap(model[0]).config.sequence_parallel:  # each TP rank holds its chunk of the sequence
        activations = {k: gather_from_sequence_parallel_region(v) for k, v in activations.items()}
    activations = {k: v.transpose(0, 1) for k, v in activations.items()}  # [s, b, h] -> [b, s, h]
    if out is not None:
        activations["logits"] = gather_from_tensor_model_parallel_region(out)[..., :vocab_size]
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        data = {k: v.float().cpu() for k, v in activations.items()}
        torch.save(data, paths.activations(tag, ps.get_pipeline_model_parallel_rank()))


def load_megatron(paths: CellPaths, tag: str, device: Any = "cpu") -> dict[str, torch.Tensor]:
    """Every stage's activations of one Megatron forward, merged (rank 0, after a barrier), on ``device``:
    the HF side's, so its comparisons run there (at a 152k vocabulary a float64 comparison on the CPU
    costs about half a second, and a cell makes a dozen)."""
    merged: dict[str, torch.Tensor] = {}
    for path in paths.all_activations(tag):
        merged.update(torch.load(path, map_location=device))
    return merged


def capture_hf(model: torch.nn.Module, store: dict[str, torch.Tensor]) -> list[Any]:
    """Hooks that keep the HF model's per-layer outputs under the Megatron side's keys."""
    hooks = []
    for name, module in model.named_modules():
        m = re.search(r"layers\.(\d+)(?:\.(self_attn|mlp))?$", name)
        if m:

            def hook(_m: Any, _i: Any, out: Any, key: str = f"layer {m.group(1)} {m.group(2) or 'output'}") -> None:
                store[key] = _first(out)

            hooks.append(module.register_forward_hook(hook))
    return hooks


def _order(key: str) -> tuple[int, int]:
    _, n, part = key.split()
    return int(n), _PARTS.index(part)


def first_divergence(meg: dict[str, torch.Tensor], hf: dict[str, torch.Tensor], tol: Tolerance) -> str:
    """``layer 1 self_attn (max |diff| ..., up to ... allowed)``: the first activation out of tolerance."""
    parts = {k for k in set(meg) & set(hf) if k != "logits" and k.split()[-1] in _PARTS}
    for key in sorted(parts, key=_order):
        if meg[key].shape != hf[key].shape:
            continue
        c = compare(meg[key], hf[key], tol)
        if not c.ok:
            return f"{key} (max |diff| {c.max_abs_diff:.3e}, up to {tol.atol:g} allowed)"
    return ""
