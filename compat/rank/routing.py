"""Routing flips: tokens an MoE router sends to other experts on one side than on the other.

Near-tied router logits, rounded in each side's own order, can pick another top-k set on one side
(issue 19: 0.076 of bf16 base drift at Qwen3-30B-A3B widths). Such a token then computes other
experts, and through attention every later position of its sequence differs: no logits bound can
tell that from an export bug. So both sides' per-layer expert choices are recorded (Megatron's
``TopKRouter``, TE's too: it is the same router over grouped experts; HF's ``mlp.gate``), the tokens
whose sets differ are named with their margin, and the logits are compared only at the positions
before each sequence's first flip. A flip is a near-tie when Megatron's logits of the swapped
experts lie within twice the router-logit drift measured at that token (if the two sides rank
a > b and b > a, then l_a - l_b <= |l_a - l'_a| + |l'_b - l_b|, whatever monotone score function
follows), and that drift is itself noise: within what ``compat.checks.compare.base_tolerance``
allows the router logits at that depth. A router with two experts' rows swapped moves the logits
by their own spread, and its flips are exactly "within twice the drift". Where adapters compute on
both sides (the adapted forwards; a merged form against the unmerged adapter, whose merged weights
are rounded once where the unmerged forward rounds two products) the noise is ``ADAPTER_GROWTH``
times that, as for the logits' bound. Any other flip is a router that differs (its weights, its
score function or its bias): a problem, not noise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from compat.checks.compare import base_tolerance

__all__ = [
    "Flips",
    "capture_hf_routing",
    "find_flips",
    "hf_forward",
    "is_distribution",
    "megatron_router_hook",
    "moe_gates",
]

ROUTER, ROUTED = "router", "routed"  # activation parts: the router logits, the chosen experts (0/1)


def megatron_router_hook(store: dict[str, torch.Tensor], layer: int) -> Any:
    """A forward hook for a ``TopKRouter``: its logits and routing map as ``[s, b, experts]``."""

    def hook(module: Any, inputs: tuple, out: Any) -> None:
        x = inputs[0]  # [s, b, h] (megatron/core/transformer/moe/moe_layer.py:444)
        logits = module.gating(x)  # what routing() ranked (megatron/core/transformer/moe/router.py:850)
        shape = (*x.shape[:-1], logits.shape[-1])
        store[f"layer {layer} {ROUTER}"] = logits.reshape(shape).float().clone()
        store[f"layer {layer} {ROUTED}"] = out[1].reshape(shape).float().clone()

    return hook


class _Restore:
    """Undoes a wrapped method, like a hook handle's ``remove``."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name

    def remove(self) -> None:
        delattr(self.obj, self.name)


def capture_hf_routing(model: torch.nn.Module, store: dict[str, torch.Tensor], ids: torch.Tensor) -> list[Any]:
    """Hooks that keep each HF MoE layer's router logits and chosen experts as ``[b, s, experts]``.

    The gate (``layers.N.mlp.gate``) gives the logits, and the indices where it returns them
    (Qwen3-MoE); blocks that choose outside their gate (DeepSeek-V3's ``route_tokens_to_experts``,
    group-limited with a bias) are read there.
    """
    hooks: list[Any] = []
    b, s = ids.shape
    for layer, mlp, gate in moe_gates(model):
        key, experts = f"layer {layer}", gate.weight.shape[0]

        def chosen(indices: torch.Tensor, key: str = key, experts: int = experts) -> None:
            one_hot = torch.zeros(indices.shape[0], experts, device=indices.device)
            store[f"{key} {ROUTED}"] = one_hot.scatter_(1, indices.long(), 1.0).reshape(b, s, experts)

        def gate_hook(
            m: Any, inputs: Any, out: Any, key: str = key, experts: int = experts, chosen: Any = chosen
        ) -> None:
            outs = out if isinstance(out, tuple) else (out,)
            logits = [t for t in outs if t.is_floating_point() and t.shape[-1] == experts]
            if logits:  # else this layer's routing is not compared: find_flips needs both sides' logits
                store[f"{key} {ROUTER}"] = _as_logits(m, inputs, logits[0]).reshape(b, s, experts).float()
            indices = [t for t in outs if not t.is_floating_point()]
            if indices:
                chosen(indices[0].reshape(b * s, -1))

        hooks.append(gate.register_forward_hook(gate_hook))
        route = getattr(mlp, "route_tokens_to_experts", None)
        if route is not None:

            def wrapped(*args: Any, route: Any = route, chosen: Any = chosen, **kwargs: Any) -> Any:
                out = route(*args, **kwargs)
                chosen(out[0].reshape(b * s, -1))
                return out

            mlp.route_tokens_to_experts = wrapped
            hooks.append(_Restore(mlp, "route_tokens_to_experts"))
    return hooks


def moe_gates(model: torch.nn.Module) -> list[tuple[int, Any, Any]]:
    """Each HF MoE layer as (layer number, its ``layers.N.mlp`` block, the block's ``gate`` with a weight)."""
    out = []
    for name, mlp in model.named_modules():
        m = re.search(r"layers\.(\d+)\.mlp$", name)
        gate = getattr(mlp, "gate", None)
        if m and gate is not None and isinstance(getattr(gate, "weight", None), torch.Tensor):
            out.append((int(m.group(1)), mlp, gate))
    return out


def hf_forward(model: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """An HF model's logits and, for MoE layers, its routing."""
    acts: dict[str, torch.Tensor] = {}
    hooks = capture_hf_routing(model, acts, ids)
    try:
        acts["logits"] = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return acts


def is_distribution(scores: torch.Tensor) -> bool:
    """Whether each row of ``scores`` is a probability distribution over the experts (a softmax's output)."""
    flat = scores.reshape(-1, scores.shape[-1]).float()
    return bool((flat >= 0).all()) and torch.allclose(flat.sum(-1), torch.ones(1, device=flat.device), atol=1e-3)


def _as_logits(gate: torch.nn.Module, inputs: Any, scores: torch.Tensor) -> torch.Tensor:
    """The router logits a gate ranked: ``scores`` as it returned them, unless they are the softmax of
    its own linear map of its input. transformers 5.3.0's TopKRouters (qwen3_moe, qwen2_moe, olmoe,
    mixtral, qwen3_next) overwrite ``router_logits`` with their softmax and return that
    (``transformers/models/qwen3_moe/modeling_qwen3_moe.py:269``, ``:275``); 5.8.1 on keep the logits
    apart as ``router_probs`` and return the logits (``:266``, ``:272``). Probabilities lie in [0, 1],
    Megatron's logits do not: the difference is no drift, and every flip would read as no near-tie.
    The logits are then recomputed by the gate's own op on its own input (bit-identical to what it
    ranked, ``F.linear(hidden_states, self.weight)``, ``:268``)."""
    x = inputs[0] if inputs else None
    weight = getattr(gate, "weight", None)
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or x.shape[-1] != weight.shape[-1]:
        return scores
    bias = getattr(gate, "bias", None)
    flat = scores.reshape(-1, scores.shape[-1])
    if not is_distribution(flat):
        return scores  # not a distribution over the experts: the logits themselves
    logits = torch.nn.functional.linear(
        x.reshape(-1, x.shape[-1]), weight, bias if isinstance(bias, torch.Tensor) else None
    )
    probs = torch.softmax(logits.float(), dim=-1)
    return logits if logits.shape == flat.shape and torch.allclose(flat.float(), probs, rtol=0, atol=1e-6) else scores


@dataclass(frozen=True)
class Flip:
    layer: int
    sequence: int
    position: int
    margin: float  # Megatron's logit gap between the experts the two sides swapped
    drift: float  # the greatest router-logit difference between the sides at this token
    noise: float  # what the router logits may drift at this depth and dtype (base_tolerance)

    @property
    def near_tie(self) -> bool:
        return self.margin <= 2 * self.drift and self.drift <= self.noise


@dataclass(frozen=True)
class Flips:
    flips: tuple[Flip, ...]
    sequences: int
    positions: int  # per sequence

    def keep(self) -> torch.Tensor:
        """``[b, s, 1]``: True before each sequence's first flip (a flip moves every later position)."""
        keep = torch.ones(self.sequences, self.positions, 1, dtype=torch.bool)
        for f in self.flips:
            keep[f.sequence, f.position :] = False
        return keep

    def metrics(self) -> dict[str, Any]:
        """What results.json keeps of the flips (``positions_compared``: of each sequence, summed)."""
        return {
            "positions_compared": int(self.keep().sum()),
            "flips": len(self.flips),
            "layers": sorted({f.layer for f in self.flips}),
            "tokens": [[f.sequence, f.position] for f in self.flips],
            "margins": [f.margin for f in self.flips],
            "drifts": [f.drift for f in self.flips],
            "noise": sorted({f.noise for f in self.flips}),
        }

    def summary(self) -> str:
        """``routing flips: 3 tokens at layers 1, 3 (margins <= 2e-3, near-ties)``, or ''."""
        if not self.flips:
            return ""
        tokens = len({(f.sequence, f.position) for f in self.flips})
        layers = ", ".join(str(n) for n in sorted({f.layer for f in self.flips}))
        ties = all(f.near_tie for f in self.flips)
        return (
            f"routing flips: {tokens} tokens at layers {layers} (margins <= {max(f.margin for f in self.flips):.1e}, "
            + ("near-ties" if ties else "not all near-ties")
            + ")"
        )

    def problems(self) -> list[str]:
        """Flips the measured drift does not explain (too few positions left: ``compare.positions_problem``)."""
        out = []
        wide = [f for f in self.flips if not f.near_tie]
        if wide:
            shown = ", ".join(
                f"layer {f.layer} sequence {f.sequence} position {f.position} "
                f"(margin {f.margin:.3e}, router-logit drift {f.drift:.3e}, noise up to {f.noise:.3e})"
                for f in wide[:3]
            )
            out.append(f"{len(wide)} tokens routed otherwise, not near-ties (margin <= 2 x drift <= noise): {shown}")
        return out


def find_flips(
    meg: dict[str, torch.Tensor], hf: dict[str, torch.Tensor], dtype: str, hidden: int, growth: float = 1.0
) -> Flips | None:
    """The tokens whose expert sets differ, per layer, or None where neither side has a router.

    ``growth``: how much further than two base models two adapted forwards may drift
    (``ADAPTER_GROWTH`` where an adapter computes on either side, as for the logits' bound).
    """
    both = {k for k in set(meg) & set(hf) if k.endswith((f" {ROUTED}", f" {ROUTER}"))}
    layers = sorted({int(k.split()[1]) for k in both if {k.replace(ROUTER, ROUTED), k.replace(ROUTED, ROUTER)} <= both})
    if not layers:
        return None
    flips: list[Flip] = []
    shape: tuple[int, ...] = (0, 0)
    for n in layers:
        mm, hm = meg[f"layer {n} {ROUTED}"].cpu() > 0.5, hf[f"layer {n} {ROUTED}"].cpu() > 0.5
        ml, hl = meg[f"layer {n} {ROUTER}"].cpu().double(), hf[f"layer {n} {ROUTER}"].cpu().double()
        shape = tuple(mm.shape[:2])
        noise = growth * base_tolerance(dtype, n + 1, hidden, ml).atol
        for b, s in (mm != hm).any(-1).nonzero().tolist():
            only_meg, only_hf = mm[b, s] & ~hm[b, s], hm[b, s] & ~mm[b, s]
            gap = float("inf")  # a side choosing another number of experts is no tie
            if only_meg.any() and only_hf.any():
                gap = float(ml[b, s][only_meg].min() - ml[b, s][only_hf].max())
            drift = float((ml[b, s] - hl[b, s]).abs().max())
            flips.append(Flip(n, b, s, abs(gap), drift, noise))
    return Flips(tuple(flips), *shape)
