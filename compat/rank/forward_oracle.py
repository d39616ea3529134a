"""The forward oracle, Megatron's side: what each adapted module added in the cell's forward pass.

End-to-end logits in bf16 cannot see a module whose forward adds 1.3x its delta (issue 33: an
expert adapter scaled so passed a 30B-A3B-width cell): the rounding of 4 layers and a 150k
vocabulary is wider. So every adapter wrapper is recorded in the forward that produces Megatron's
logits (its adapter's input, its base output, its output, and for grouped experts the tokens each
expert received) and judged on its own, per expert: the contribution ``output - base output``
against ``scale * X @ A.T @ B.T`` from the adapter's stored values in float64, with the bound of
that one product's rounding (``compat.checks.contribution``). Routing does not enter: each expert
is judged on the tokens it actually received.

How a local GEMM's product is laid out follows the base weight, as megatron-core defines it (its
``partition_dim``, the input gathered over sequence-parallel ranks for a column-parallel layer, the
output summed over the group for a row-parallel one unless experts communicate explicitly), never
the adapter under test. DoRA is judged by its own maths, ``m / ||W + delta||`` of the full row
times the adapted output, as peft computes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from compat.checks.contribution import UNIT_ROUNDOFF, Judgement, judge, noise_model
from compat.rank.adapted_weights import AdaptedWeight

__all__ = ["Recorder", "judge_weights", "recording"]


class Recorder:
    """What each adapter wrapper saw and produced in one forward (every call kept)."""

    def __init__(self) -> None:
        self.calls: dict[int, list[dict[str, Any]]] = {}

    def hooks(self, wrappers: list[Any]) -> list[Any]:
        out = []
        for m in wrappers:
            # canonical LoRA's branches all read the layer's input: the first branch's is recorded
            adapter_in = getattr(m.adapter, "adapter_q", None) or getattr(m.adapter, "adapter_gate", None) or m.adapter
            out += [
                m.register_forward_pre_hook(self._start(m)),
                adapter_in.register_forward_pre_hook(self._put(m, "x")),
                m.to_wrap.register_forward_hook(self._base(m)),
                m.register_forward_hook(self._end(m)),
            ]
        return out

    def _start(self, m: Any) -> Any:
        def hook(_m: Any, args: tuple) -> None:
            splits = args[1] if len(args) > 1 else None
            if isinstance(splits, torch.Tensor):
                splits = splits.tolist()
            self.calls.setdefault(id(m), []).append({"splits": list(splits) if splits is not None else None})

        return hook

    def _put(self, m: Any, key: str) -> Any:
        def hook(_m: Any, args: tuple) -> None:
            calls = self.calls.get(id(m))
            if calls and args and isinstance(args[0], torch.Tensor):  # TE's op fuser calls hooks with None
                calls[-1].setdefault(key, args[0].detach().clone())

        return hook

    def _base(self, m: Any) -> Any:
        def hook(_m: Any, _args: tuple, out: Any) -> None:
            calls = self.calls.get(id(m))
            if calls:
                calls[-1]["b"] = _linear_output(out).detach().clone()

        return hook

    def _end(self, m: Any) -> Any:
        def hook(_m: Any, _args: tuple, out: Any) -> None:
            calls = self.calls.get(id(m))
            if calls:
                calls[-1]["y"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        return hook


def _linear_output(out: Any) -> torch.Tensor:
    """The base linear's output among what Megatron's linears return (``AdapterWrapper.base_linear_forward``'s
    patterns: ``out``, ``(out, bias)``, ``((out, ln_out), bias)``, ``(out, bias, ln_out)``)."""
    while isinstance(out, tuple):
        out = out[0]
    return out


@contextlib.contextmanager
def recording(weights: list[AdaptedWeight]) -> Iterator[Recorder]:
    """Hooks on the adapted weights' wrappers for the forward run inside."""
    rec = Recorder()
    wrappers = list({id(w.wrapper): w.wrapper for w in weights}.values())
    hooks = rec.hooks(wrappers)
    try:
        yield rec
    finally:
        for h in hooks:
            h.remove()


def judge_weights(weights: list[AdaptedWeight], rec: Recorder, dtype: str) -> list[dict[str, Any]]:
    """Collective over the weights' TP groups (same order on every peer): one entry per weight and call."""
    out = []
    for w in weights:
        calls = rec.calls.get(id(w.wrapper)) or []
        if not calls:
            out.append({"name": w.name, "hf": list(w.hf), "where": w.where(), "judged": False,
                        "why": "its wrapper did not run in the forward"})  # fmt: skip
            continue
        for call in calls:
            out.append(_judge_call(w, call, dtype))
    return out


def _judge_call(w: AdaptedWeight, call: dict[str, Any], dtype: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": w.name, "hf": list(w.hf), "where": w.where()}
    if not all(k in call for k in ("x", "b", "y")):
        missing = [k for k in ("x", "b", "y") if k not in call]
        return {**entry, "judged": False, "why": f"the forward did not show its {', '.join(missing)}"}
    x, b, y = call["x"], call["b"], call["y"]
    if w.local_expert is not None:
        x, b, y = _expert_rows(call["splits"], w.local_expert, x, b, y)
    x = _gathered_input(w, x, y)
    split = _differs_across_ranks(w, x)
    if split:
        return {**entry, "judged": True, "ok": False, "finding": split}
    ref, through_b, through_a = _reference(w, x)
    ref, through_b, through_a = (_local_sequence(w, t, y) for t in (ref, through_b, through_a))
    b2, y2 = b.reshape(-1, b.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    if b2.shape != ref.shape or y2.shape != ref.shape:
        finding = f"its output has shape {tuple(y2.shape)}, the stored adapter's product {tuple(ref.shape)}"
        return {**entry, "judged": True, "ok": False, "finding": finding}
    if y2.shape[0] == 0:
        return {**entry, "judged": False, "why": "no token reached it"}
    extra = None
    if w.kind == "dora":
        ratio = _dora_ratio(w).to(ref.device)
        u = UNIT_ROUNDOFF[dtype]
        extra = 2 * u * ratio * (b2.abs() + ref.abs())
        ref, through_b, through_a = (ratio - 1) * b2 + ratio * ref, ratio * through_b, ratio * through_a
    r = max(br.a.shape[0] for br in w.branches)
    noise = noise_model(dtype, y2, ref, through_b, through_a, x.shape[-1], r, extra)
    j = judge(y2 - b2, ref, noise, dtype)
    return {**entry, "judged": True, "ok": j.ok, **_measures(j)}


def _measures(j: Judgement) -> dict[str, Any]:
    return {
        "gain": j.gain,
        "gain_allowed": j.gain_allowed,
        "residual": j.residual,
        "residual_allowed": j.residual_allowed,
        "rows": list(j.rows),
        "tokens": j.tokens,
        "finding": "" if j.ok else j.describe(),
    }


def _expert_rows(splits: list[int] | None, i: int, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of grouped-expert tensors that local expert ``i`` received (``m_splits``)."""
    if splits is None:
        raise ValueError("a grouped-expert wrapper ran without its tokens-per-expert split")
    start = sum(int(s) for s in splits[:i])
    return tuple(t.reshape(-1, t.shape[-1])[start : start + int(splits[i])] for t in ts)


def _gathered_input(w: AdaptedWeight, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The input the local GEMM multiplied: a column-parallel layer's input gathered over sequence-
    parallel ranks (its output then holds every token), as rows [tokens, k]."""
    if not w.row_parallel and x.dim() == 3 and x.shape[0] != y.shape[0]:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        x = gather_from_sequence_parallel_region(x, group=w.group)
    return x.reshape(-1, x.shape[-1]).double()


def _differs_across_ranks(w: AdaptedWeight, x: torch.Tensor) -> str:
    """A column-parallel layer multiplies one input on every rank of its group (its gathered products
    assume so); an input that differs between them is the finding, not the products it feeds."""
    import torch.distributed as dist

    if w.row_parallel or w.group is None or dist.get_world_size(w.group) == 1:
        return ""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(w.group))]
    dist.all_gather(parts, x.contiguous(), group=w.group)
    worst = max(float((p - parts[0]).abs().max()) if p.numel() else 0.0 for p in parts)
    if worst == 0.0:
        return ""
    return f"its input differs between the tensor-parallel ranks (max |diff| {worst:.3e}): they diverged upstream"


def _reference(w: AdaptedWeight, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``X @ delta.T``, and the two spreads ``noise_model`` takes), summed over the group where the
    base output is."""
    rows = w.weight.shape[0]
    ref = x.new_zeros(x.shape[0], rows)
    through_b, through_a = x.new_zeros(x.shape[0], rows), x.new_zeros(x.shape[0], rows)
    for br in w.branches:
        a, b = br.a.to(x.device).double(), br.b.to(x.device).double()
        h, h2 = x @ a.T, (x * x) @ (a * a).T
        if w.reduced:
            h, h2 = _summed(h, w.group), _summed(h2, w.group)
        cols = slice(None) if br.rows is None else br.rows.to(x.device)
        ref[:, cols] += br.scale * h @ b.T
        through_b[:, cols] += (br.scale * br.scale) * (h * h) @ (b * b).T
        through_a[:, cols] += (br.scale * br.scale) * h2 @ (b * b).T
    return ref, through_b.sqrt(), through_a.sqrt()


def _summed(t: torch.Tensor, group: Any) -> torch.Tensor:
    import torch.distributed as dist

    t = t.contiguous()
    dist.all_reduce(t, group=group)
    return t


def _local_sequence(w: AdaptedWeight, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A row-parallel layer under sequence parallelism leaves each rank its chunk of the sequence
    (reduce-scatter along it): that chunk of a full-sequence product. Rows run sequence-major
    ([s, b] flattened), so a chunk of positions is a block of rows."""
    tokens = y.reshape(-1, y.shape[-1]).shape[0]
    if t.shape[0] == tokens or not w.reduced:
        return t
    import torch.distributed as dist

    rank = dist.get_rank(group=w.group)
    return t[rank * tokens : (rank + 1) * tokens]


def _dora_ratio(w: AdaptedWeight) -> torch.Tensor:
    """``m / ||W + delta||`` per output row, the norm over the full row (summed over a row-parallel group)."""
    merged = w.weight.detach().double() + w.delta().double()
    sq = (merged * merged).sum(dim=1)
    if w.row_parallel:
        sq = _summed(sq, w.group)
    assert w.magnitude is not None  # a DoRA weight carries its magnitude (adapted_weights)
    return (w.magnitude.double().to(sq.device) / sq.sqrt()).reshape(1, -1)
