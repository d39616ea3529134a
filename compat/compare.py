"""Tensor comparison with messages that read like ``torch.testing.assert_close``.

Tolerances live in one table, per dtype; atol and rtol go together. A mismatch says how many
elements differ and what share, the greatest absolute and relative difference and where, the
tolerance allowed, and the context (cell, rank, layer, tensor) the caller adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "EFFECT_MIN_SHARE",
    "TOLERANCES",
    "WEIGHT_TOLERANCES",
    "Comparison",
    "Tolerance",
    "compare",
    "effect_problem",
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

    @property
    def ok(self) -> bool:
        return self.mismatched == 0

    def message(self, what: str, index_names: tuple[str, ...] = ()) -> str:
        where = ", ".join(f"{n} {i}" for n, i in zip(index_names, self.worst_index, strict=False)) or str(
            self.worst_index
        )
        share = 100.0 * self.mismatched / max(self.total, 1)
        return (
            f"{what}: mismatched elements: {self.mismatched} / {self.total} ({share:.1f}%); "
            f"greatest absolute difference: {self.max_abs_diff:.3e} at {where} "
            f"(up to {self.tolerance.atol:g} allowed); greatest relative difference: "
            f"{self.max_rel_diff:.3e} (up to {self.tolerance.rtol:g} allowed)"
        )


def compare(actual: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance) -> Comparison:
    """Elementwise |a - e| <= atol + rtol * |e| in float64; NaN anywhere is a mismatch."""
    import torch

    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    rel = diff / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    bad = diff > tolerance.atol + tolerance.rtol * e.abs()
    flat = int(diff.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return Comparison(
        max_abs_diff=float(diff.max()),
        max_rel_diff=float(rel.max()),
        mismatched=int(bad.sum()),
        total=diff.numel(),
        worst_index=index,
        tolerance=tolerance,
    )


def effect_problem(base: torch.Tensor, adapted: torch.Tensor, tolerance: Tolerance) -> str | None:
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
        f"max |peft - base| = {c.max_abs_diff:.3e}"
    )


def token_agreement(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Share of positions whose top-1 token agrees (reported for bf16)."""
    return float((actual.argmax(-1).cpu() == expected.argmax(-1).cpu()).double().mean())
