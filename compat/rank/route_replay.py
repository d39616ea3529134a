"""Routing replay: an HF forward whose MoE layers compute with the experts another forward chose.

With many experts (128, top-8) the k-th and (k+1)-th router logits are near-ties at almost every
token, bf16 rounds them differently on the two sides, and from a sequence's first flip on its logits
cannot be compared (``compat.rank.routing``): too few positions may be left to vouch for the adapter.
RL frameworks meet the same near-ties between trainer and rollout and answer them by replaying the
trainer's routing in the rollout; the harness does the same on the HF side, and only where the flips
are all near-ties (a router that differs is a problem, never replayed away) and too few positions
remain. Each gate still scores the tokens with its own weights: it is given only which experts to use,
and weighs them with its own probabilities, so the router's scores, the experts and the adapters are
all still compared at every position.

A gate is replayed only where its score function is recognised: its own weights for its own choice
are recomputed from its logits (softmax over the experts, the top-k renormalised or not) and must equal
what it returned bit for bit, else the replay is refused with the reason (DeepSeek-V3's group-limited
routing outside the gate, for one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compat.checks.compare import ADAPTER_GROWTH, positions_problem
from compat.rank.routing import ROUTED, find_flips, hf_forward, is_distribution, moe_gates

__all__ = ["Paired", "Unreplayable", "pair_routing", "replay_forward"]

Acts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Paired:
    """Two forwards' activations to compare, and at which logits positions."""

    first: Acts
    second: Acts
    keep: torch.Tensor | None = None  # [b, s, 1]: the positions before each sequence's first flip; None: all
    clause: str = ""  # the flips, for a mismatch's message
    problems: tuple[str, ...] = ()  # flips that are no near-tie; too few positions left


def pair_routing(
    first: Acts,
    second: Acts,
    pair: str,
    dtype: str,
    hidden: int,
    metrics: dict[str, Any],
    replay: Callable[[], tuple[Acts, Acts]] | None = None,
) -> Paired:
    """The positions a pair compares (``compat.rank.routing``: those before each sequence's first
    routing flip), the flips as a clause for a mismatch's message, and the flips that are no near-tie;
    the flips go to ``metrics["routing"][pair]``. A flip that is no near-tie is said once by the caller:
    inside the logits mismatch where the compared logits differ anyway (a defect upstream of the router
    moves both: one cause), as a ``routing`` problem of its own where they agree (the mask must hide
    nothing). Where every flip is a near-tie but too few positions remain, ``replay()`` (one side
    recomputed with the other's routing) gives the pair back, compared at every position, if it routes
    alike; else the flips stand, with why the replay did not help."""
    growth = 1.0 if pair == "base" else ADAPTER_GROWTH  # adapters compute on both sides: as the logits' bound
    flips = find_flips(first, second, dtype, hidden, growth)
    if flips is None:
        return Paired(first, second)
    found = metrics.setdefault("routing", {})[pair] = flips.metrics()
    if not flips.flips:
        return Paired(first, second)  # no flip: every position is compared, and any message reads as before
    found["finding"] = flips.summary()
    keep = flips.keep()
    few = positions_problem(keep, pair)
    if few and replay is not None and not flips.problems():
        try:
            again_first, again_second = replay()
            again = find_flips(again_first, again_second, dtype, hidden, growth)
            if again is not None and again.flips:
                raise Unreplayable(f"{len(again.flips)} tokens still routed otherwise")
        except Unreplayable as exc:
            found["replay"] = f"not replayed: {exc}"
        else:
            found["replay"] = "replayed: one side recomputed with the other's experts, every position compared"
            found["positions_compared"] = int(keep.numel())
            return Paired(again_first, again_second)
    clause = f"; {found['finding']}, positions from each sequence's first flip on not compared"
    return Paired(first, second, keep, clause, (*(f"{pair}: {p}" for p in flips.problems()), *([few] if few else [])))


class Unreplayable(Exception):
    """Why a model's routing cannot be replayed (the flips then stay as they were)."""


def replay_forward(
    model: torch.nn.Module, ids: torch.Tensor, routed: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``model``'s logits and routing (as ``hf_forward``) with every MoE layer's experts taken from
    ``routed`` (``layer N routed``: ``[b, s, experts]``, 1 where chosen). Raises :class:`Unreplayable`."""
    gates = {
        layer: gate for layer, mlp, gate in moe_gates(model) if getattr(mlp, "route_tokens_to_experts", None) is None
    }
    if not gates:  # blocks that choose outside their gate (group-limited, biased) are not replayed
        raise Unreplayable("no MoE gate returns its chosen experts (layers.N.mlp.gate)")
    missing = sorted(n for n in gates if f"layer {n} {ROUTED}" not in routed)
    if missing:
        raise Unreplayable(f"the forward to replay recorded no routing at layers {missing}")
    problems: list[str] = []
    hooks = [
        gate.register_forward_hook(_forcing(routed[f"layer {n} {ROUTED}"], n, problems)) for n, gate in gates.items()
    ]
    try:  # the forcing hooks first: hf_forward's own record what the layers used
        with torch.no_grad():
            acts = hf_forward(model, ids)
    finally:
        for h in hooks:
            h.remove()
    if problems:
        raise Unreplayable("; ".join(problems))
    return acts


def _forcing(chosen: torch.Tensor, layer: int, problems: list[str]) -> Any:
    """A forward hook that returns the gate's output with ``chosen``'s experts, weighed by the gate."""

    def hook(gate: torch.nn.Module, inputs: Any, out: Any) -> Any:
        if not isinstance(out, tuple):
            problems.append(f"layer {layer}: the gate returns no chosen experts")
            return None
        at = {i for i, t in enumerate(out) if isinstance(t, torch.Tensor) and not t.is_floating_point()}
        floats = [i for i, t in enumerate(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if len(at) != 1 or len(floats) != 2:
            problems.append(f"layer {layer}: the gate's output is not (logits, weights, experts)")
            return None
        (i_idx,) = at
        idx = out[i_idx]
        k = idx.shape[-1]
        i_logits, i_w = sorted(floats, key=lambda i: out[i].shape[-1] == k)  # the weights are [tokens, k]
        found = _score_function(out[i_logits], out[i_w], idx)
        if found is None:
            problems.append(f"layer {layer}: the gate's weights are no softmax top-k this replay recognises")
            return None
        want = chosen.to(idx.device).reshape(-1, chosen.shape[-1])
        if want.shape[0] != idx.shape[0] or not bool((want.sum(-1) == k).all()):
            problems.append(
                f"layer {layer}: the routing to replay does not choose {k} experts at each of {idx.shape[0]} tokens"
            )
            return None
        probs, score = found
        # the given experts in the gate's own order (by its probabilities, as its top-k ranks them): the experts'
        # outputs are summed in that order, so a layer given its own choice computes bit for bit as before
        forced = probs.masked_fill(want < 0.5, float("-inf")).topk(k, dim=-1).indices.to(idx.dtype)
        replaced = list(out)
        replaced[i_idx], replaced[i_w] = forced, score(forced)
        return tuple(replaced)

    return hook


def _score_function(logits: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> Any:
    """The gate's probabilities, and its weights of given experts as a function, if one of the known forms
    gives back its own weights for its own choice bit for bit: a softmax over the experts (of the logits,
    or the returned scores as they are where transformers returns probabilities), renormalised over the
    top-k or not."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    candidates = [torch.softmax(flat, dim=-1)]
    if is_distribution(flat):
        candidates.append(flat)  # already probabilities (transformers 5.3.0's TopKRouters)
    for probs in candidates:
        for renormalise in (True, False):

            def score(
                experts: torch.Tensor, probs: torch.Tensor = probs, renormalise: bool = renormalise
            ) -> torch.Tensor:
                w = probs.gather(1, experts.long())
                if renormalise:
                    w = w / w.sum(dim=-1, keepdim=True)
                return w.to(weights.dtype)

            own = score(idx)
            if torch.equal(own, weights.reshape(own.shape)):
                return probs, score
    return None
