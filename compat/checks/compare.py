"""Logits and weights compared, with messages that read like ``torch.testing.assert_close``, and the
bounds they are held to.

The toy's bounds are a table per dtype (atol and rtol together); at real widths the logits' bounds are
derived at run time from the drift of the two base models (``base_tolerance``, ``adapter_tolerance``,
``merged_tolerance``; docs/verdict.md explains them). Other checks keep their own bounds beside them:
the per-module oracles (``compat.checks.contribution``, ``compat.checks.oracles.DELTA_RTOL``), peft's
fused experts (``compat.checks.fused_experts``), the serving engines (their pins in matrix/serving/).
A mismatch says how many elements differ and what share, the greatest absolute and relative difference
and where, the tolerance allowed, and the context (cell, rank, layer, tensor) the caller adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_GROWTH",
    "EFFECT_MIN_SHARE",
    "MIN_POSITIONS",
    "NOISE_SAFETY",
    "TOLERANCES",
    "WEIGHT_TOLERANCES",
    "Bounds",
    "Comparison",
    "Tolerance",
    "adapter_tolerance",
    "base_tolerance",
    "bounds_from_bases",
    "compare",
    "effect_problem",
    "forward_noise",
    "merged_tolerance",
    "positions_problem",
    "token_agreement",
    "torch_dtype",
]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def __str__(self) -> str:
        return f"atol={self.atol:g}, rtol={self.rtol:g}"


# fp32: both sides compute the same math in fp32; about 2e-7 is seen, 1e-5 allowed.
# bf16: each side rounds activations to bf16 in its own order (8 bits of mantissa).
TOLERANCES = {
    "fp32": Tolerance(atol=1e-5, rtol=0.0),
    "bf16": Tolerance(atol=5e-2, rtol=5e-2),
}

# At any size: deeper and wider models drift further apart before any adapter than the toy the table is
# for. The model of that drift, from its causes: each of L layers rounds the residual stream once per side
# in its own order (bf16: unit roundoff u = 2^-8 of the value; fp32: 2^-24 per term of a dot product of
# `hidden` terms, growing as sqrt(hidden)), independently, so the logits drift as a random walk,
# sqrt(L) * u_eff * rms(logits) in spread; the greatest of N logits lies about sqrt(2 ln N) spreads out.
# NOISE_SAFETY: the base models' margin over that model (a conversion bug moves the logits by their own
# size, not by a few roundings). ADAPTER_GROWTH: how much further two adapted forwards may drift than the
# bases, measured over seeds of the base (matrix/noise/, committed results): 1.2-3.3x, so 4. The
# measured base drift is itself the greatest of N draws and can fall below the model: the adapted bound
# takes the larger of the two (adapter_tolerance). Positions after a routing flip are not compared
# (compat/rank/routing.py).
NOISE_SAFETY = 3.0
ADAPTER_GROWTH = 4.0
_UNIT_ROUNDOFF = {"fp32": 0.0, "bf16": 2**-8}  # activations stored in the cell's dtype
_ACCUMULATION = 2**-24  # fp32 accumulation in both dtypes


def forward_noise(dtype: str, layers: int, hidden: int, reference: torch.Tensor) -> float:
    """The expected greatest logit drift between two implementations of one model (derivation above)."""
    import math

    n = reference.numel()
    rms = float(reference.detach().double().pow(2).mean().sqrt())
    per_layer = _UNIT_ROUNDOFF[dtype] + _ACCUMULATION * math.sqrt(hidden)
    return math.sqrt(layers) * per_layer * rms * math.sqrt(2 * math.log(max(n, 2)))


def base_tolerance(dtype: str, layers: int, hidden: int, reference: torch.Tensor) -> Tolerance:
    """What the base models may drift apart at this size and dtype: NOISE_SAFETY x the modelled drift."""
    t = TOLERANCES[dtype]
    return Tolerance(atol=max(t.atol, NOISE_SAFETY * forward_noise(dtype, layers, hidden, reference)), rtol=t.rtol)


@dataclass(frozen=True)
class Bounds:
    """The two base models compared, and the bounds that follow from them (written once, for every path
    that compares adapted logits: the file export's peft, the in-memory consumers)."""

    base: Tolerance  # what the base models may drift apart: NOISE_SAFETY x the modelled drift
    drift: Comparison  # the base models' comparison under it (its max_abs_diff is the measured drift)
    modelled: float  # forward_noise at this size and dtype
    adapted: Tolerance  # the adapted logits' bound (adapter_tolerance, capped at the base bound)


def bounds_from_bases(
    dtype: str, layers: int, hidden: int, megatron: torch.Tensor, hf: torch.Tensor, keep: torch.Tensor | None = None
) -> Bounds:
    """Compare the base models' logits (``keep``: the positions before routing flips) and derive the bounds."""
    base = base_tolerance(dtype, layers, hidden, hf)
    drift = compare(megatron, hf, base, keep)
    modelled = forward_noise(dtype, layers, hidden, hf)
    adapted = adapter_tolerance(dtype, drift.max_abs_diff, modelled, base_allowed=base.atol)
    return Bounds(base, drift, modelled, adapted)


def adapter_tolerance(
    dtype: str,
    base_drift: float | None,
    modelled: float = 0.0,
    table: Tolerance | None = None,
    base_allowed: float | None = None,
) -> Tolerance:
    """The adapted logits' bound: ADAPTER_GROWTH x the base models' drift, measured or, where the measured
    maximum fell below it, modelled (``forward_noise``); never below ``table`` (the dtype's, or a serving
    engine's pins), which is the bound without a measurement.

    Capped, for every caller that measured a drift: the measured drift counts only up to what the base
    check allows (``base_allowed``, its absolute bound). Past that the base models differ by a conversion
    fault, not by rounding, and a bound grown with the fault would let the same fault, or another one of
    its size, through the adapted comparison.
    """
    t = table or TOLERANCES[dtype]
    if base_drift is None:
        return t
    if base_allowed is None:
        raise ValueError("a measured base drift needs the base check's bound (base_allowed): the cap")
    drift = min(base_drift, base_allowed)
    return Tolerance(atol=max(t.atol, ADAPTER_GROWTH * max(drift, modelled)), rtol=t.rtol)


def merged_tolerance(dtype: str, adapted: Tolerance, layers: int, reference: torch.Tensor) -> Tolerance:
    """A merged form's bound against the unmerged adapter: the adapted bound, and the rounding of the
    merged weights ``W + delta`` into the dtype (once per weight, where the unmerged forward rounds the
    two products instead). That rounding is one more error of ``u`` relative per layer's output, of the
    activations' own size, so it adds ``ADAPTER_GROWTH x`` the modelled drift of weights rounded that
    way, in quadrature (independent of the activations' rounding). A base drift measured as exactly 0
    (bitwise-identical kernels on both sides) leaves only the modelled terms: this one must be there.
    It is ``forward_noise`` without accumulation: one rounding of ``u`` per layer (``hidden`` 0)."""
    import math

    rounding = forward_noise(dtype, layers, 0, reference)
    return Tolerance(atol=math.hypot(adapted.atol, ADAPTER_GROWTH * rounding), rtol=adapted.rtol)


# Weights merged by two code paths (peft merging the adapter export; the bridge's merged export)
# compute W + (alpha / r) B A in the weights' dtype, each in its own order, so each may round the
# delta and the sum once: they may lie an ulp of the value or of the delta apart. This is the share
# allowed of both (per tensor: rtol of the value, and atol of the tensor's largest merged delta):
# 2^-6 in bf16 (7 bits of mantissa, two roundings), 1e-6 in fp32. Measured on the full CPU matrix:
# 0 everywhere but bf16 qwen3_moe experts, 4.9e-4 (transformers merges the fused gate_up, rounding
# a delta of up to about 0.06). A wrong split moves rows by the delta's own size (the planted q/k
# swap: 8.9e-2 on weights of about 0.1).
WEIGHT_TOLERANCES = {"fp32": 1e-6, "bf16": 2**-6}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a cell's dtype name; torch is imported here, never when ``compat`` loads."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


# Routing flips (compat.rank.routing) hide every position from a sequence's first flip on. A comparison
# left with fewer than this many positions past each sequence's first (which attends to itself alone)
# has seen too little of the model to vouch for it: a problem, not a pass. Eight sequences are run
# (compat.rank.activations.SEQUENCES), so this asks that about one position in fifteen survive.
MIN_POSITIONS = 8


def positions_problem(keep: torch.Tensor | None, what: str) -> str | None:
    """Why a comparison restricted to ``keep`` ([b, s, 1]) saw too few positions, or None."""
    if keep is None:
        return None
    seen = int(keep[:, 1:].sum())
    if seen >= MIN_POSITIONS:
        return None
    return (
        f"{what}: routing flips left {seen} positions past each sequence's first compared, at least "
        f"{MIN_POSITIONS} needed (the positions a flip hides cannot vouch for the adapter)"
    )


# The adapter must move the logits by more than the tolerance, in at least this share of them: the
# logits without the adapter must fail the very comparison the cell makes, or agreement proves nothing.
EFFECT_MIN_SHARE = 0.5


@dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    max_rel_diff: float
    mismatched: int
    total: int
    worst_index: tuple[int, ...]
    tolerance: Tolerance
    non_finite: int = 0  # elements NaN or infinite on either side (each a mismatch)

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def message(self, what: str, index_names: tuple[str, ...] = ()) -> str:
        where = ", ".join(f"{n} {i}" for n, i in zip(index_names, self.worst_index, strict=False)) or str(
            self.worst_index
        )
        share = 100.0 * self.mismatched / max(self.total, 1)
        odd = f" ({self.non_finite} not finite)" if self.non_finite else ""
        return (
            f"{what}: mismatched elements: {self.mismatched} / {self.total} ({share:.1f}%){odd}; "
            f"greatest absolute difference: {self.max_abs_diff:.3e} at {where} "
            f"(up to {self.tolerance.atol:g} allowed); greatest relative difference: "
            f"{self.max_rel_diff:.3e} (up to {self.tolerance.rtol:g} allowed)"
        )


def compare(
    actual: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance, keep: torch.Tensor | None = None
) -> Comparison:
    """Elementwise |a - e| <= atol + rtol * |e| in float64; a NaN or infinity on either side is a
    mismatch (peft's logits and merged weights are the ``expected`` side: their NaN must not pass).

    ``keep``: a boolean mask broadcast over the tensors; only its elements are compared and counted
    (the logits before a routing flip, ``compat.rank.routing``)."""
    import torch

    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    a = actual.detach().double()  # on the tensors' own device: at real widths a CPU pass costs seconds
    e = expected.detach().double().to(a.device)
    odd = ~(torch.isfinite(a) & torch.isfinite(e))
    diff = torch.where(odd, torch.full_like(a, float("inf")), (a - e).abs())
    rel = diff / e.abs().nan_to_num(0.0).clamp_min(torch.finfo(torch.float64).tiny)
    bad = odd | (diff > tolerance.atol + tolerance.rtol * e.abs())
    total = diff.numel()
    if keep is not None:
        keep = keep.to(diff.device).expand_as(diff)
        diff, rel = torch.where(keep, diff, 0.0), torch.where(keep, rel, 0.0)
        bad, odd, total = bad & keep, odd & keep, int(keep.sum())
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(diff.shape)))
    return Comparison(
        max_abs_diff=float(diff.max()),
        max_rel_diff=float(rel.max()),
        mismatched=int(bad.sum()),
        total=total,
        worst_index=index,
        tolerance=tolerance,
        non_finite=int(odd.sum()),
    )


def effect_problem(base: torch.Tensor, adapted: torch.Tensor, tolerance: Tolerance, side: str = "peft") -> str | None:
    """Why the adapter's effect is too small to prove anything at ``tolerance``, or None.

    The logits without the adapter are compared with the adapted ones under the cell's own
    tolerance: if too few of them differ, a side that lost the adapter would still agree.
    """
    c = compare(base, adapted, tolerance)
    share = c.mismatched / max(c.total, 1)
    if share >= EFFECT_MIN_SHARE:
        return None
    return (
        f"the adapter does not change the logits beyond the tolerance: without it {c.mismatched} / {c.total} "
        f"({100 * share:.1f}%) logits differ by more than {tolerance} (at least {100 * EFFECT_MIN_SHARE:.0f}% must); "
        f"max |{side} - base| = {c.max_abs_diff:.3e}"
    )


def token_agreement(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Share of positions whose top-1 token agrees (reported for bf16)."""
    return float((actual.argmax(-1).cpu() == expected.argmax(-1).cpu()).double().mean())
