"""Judging one adapted module in flight: what its forward added against what its stored adapter says.

A module's contribution ``d`` (its output minus its base output, as the forward computed them) is
compared with ``ref = scale * X @ A.T @ B.T`` computed in float64 from the module's recorded input
and the adapter's stored factors. Their difference is the rounding of that one low-rank product
(and of the sum ``base + adapter``) in the cell's dtype, so the bound comes from those roundings at
this module's size, not from the depth or vocabulary of the model:

- ``noise``, per element, an upper estimate of the rounding's standard deviation (``noise_model``):
  the output rounded (unit roundoff ``u`` of the dtype, of ``|y|``, and of ``|ref|`` for the
  adapter's product and again for its scaling), the rank-r intermediate ``H = X @ A.T`` rounded and
  carried through ``B`` (``u * scale * sqrt(H^2 @ B^2.T)``), and fp32 accumulation (``2^-24 sqrt(k)``
  of the terms, k the dot length), added in quadrature. Rounding to nearest errs by at most ``u``
  relative, so taking ``u`` as the spread overstates it (uniform errors have ``u / sqrt 3``).
- the **gain** ``g = <d, ref> / <ref, ref>``: a forward that adds its delta 1.02x or 1.3x has
  ``g`` = 1.02 or 1.3, whatever the noise does elementwise; rounding moves ``g`` by its standard
  error ``sqrt(sum noise^2 ref^2) / <ref, ref>`` (independent roundings) plus a systematic ``u``
  (a scale such as ``alpha / r`` held in the dtype is up to ``u`` off: 7/5 in bf16 is 0.11%).
  Allowed: ``u + GAIN_Z x`` that error.
- the **residual** ``||d - ref|| / ||ref||``: a wrong layout, expert or input moves ``d`` by its own
  size (residual ~1) whatever its gain. Allowed: ``u + RESIDUAL_Z x ||noise|| / ||ref||`` (the norm
  of many independent errors lies close to its expectation; ``noise`` overstates it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["GAIN_Z", "RESIDUAL_Z", "UNIT_ROUNDOFF", "Judgement", "judge", "noise_model"]

UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8}
ACCUMULATION = 2.0**-24  # GEMMs accumulate in fp32 in both dtypes (TF32 is off on GPUs: rank_env)
GAIN_Z = 6.0
RESIDUAL_Z = 3.0


@dataclass(frozen=True)
class Judgement:
    """One module's (or one expert's) contribution against its reference."""

    gain: float
    gain_allowed: float  # |gain - 1| allowed
    residual: float  # ||d - ref|| / ||ref||
    residual_allowed: float
    rows: tuple[int, ...]  # the input rows (tokens) whose own residual is beyond their noise
    tokens: int

    @property
    def ok(self) -> bool:
        return abs(self.gain - 1) <= self.gain_allowed and self.residual <= self.residual_allowed  # NaN fails

    def describe(self) -> str:
        return (
            f"gain {self.gain:.4f} (1 +- {self.gain_allowed:.2g} allowed), relative error {self.residual:.2e} "
            f"(up to {self.residual_allowed:.2g} allowed) over {self.tokens} tokens"
        )


def noise_model(
    dtype: str,
    y: torch.Tensor,
    ref: torch.Tensor,
    through_b: torch.Tensor,
    through_a: torch.Tensor,
    k: int,
    r: int,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per element, an upper estimate of the rounding's spread between ``d`` and ``ref`` (module docstring):
    each rounding's bound ``u * |value|`` taken as its spread, the independent ones added in quadrature.

    ``through_b``: ``scale * sqrt(H^2 @ B^2.T)``; ``through_a``: ``scale * sqrt((X^2 @ A^2.T) @ B^2.T)``;
    ``k``, ``r``: the input width and the rank (dot lengths); ``extra``: further terms (DoRA's norm).
    """
    u = UNIT_ROUNDOFF[dtype]
    terms = [
        u * y,  # the sum base + adapter rounded
        math.sqrt(2) * u * ref,  # the adapter's product and its scaling, each rounded
        (u + ACCUMULATION * math.sqrt(r)) * through_b,  # H rounded, carried through B; B's dot accumulated
        ACCUMULATION * math.sqrt(max(k, 1)) * through_a,  # H's dot of length k accumulated in fp32
    ]
    if extra is not None:
        terms.append(extra)
    total = terms[0].double() ** 2
    for t in terms[1:]:
        total = total + t.double() ** 2
    return total.sqrt()


def judge(d: torch.Tensor, ref: torch.Tensor, noise: torch.Tensor, dtype: str) -> Judgement:
    """``d`` against ``ref`` ([tokens, outputs], float64) with the per-element ``noise`` spread."""
    import torch

    d, ref, noise = d.double(), ref.double(), noise.double()
    u = UNIT_ROUNDOFF[dtype]
    rr = float((ref * ref).sum())
    diff = d - ref
    tokens = d.shape[0]
    if rr == 0.0:
        zero = float(d.abs().max()) if d.numel() else 0.0
        return Judgement(1.0 if zero == 0 else math.inf, 0.0, zero, 0.0, (), tokens)
    gain = float((d * ref).sum()) / rr
    se = math.sqrt(float((noise * noise * ref * ref).sum())) / rr
    norm = math.sqrt(rr)
    residual = float(torch.linalg.vector_norm(diff)) / norm
    allowed = u + RESIDUAL_Z * float(torch.linalg.vector_norm(noise)) / norm
    row_off = torch.linalg.vector_norm(diff, dim=1) > RESIDUAL_Z * torch.linalg.vector_norm(noise, dim=1) + u * (
        torch.linalg.vector_norm(ref, dim=1)
    )
    if not math.isfinite(residual):
        residual = math.inf
    return Judgement(
        gain=gain if math.isfinite(gain) else math.inf,
        gain_allowed=u + GAIN_Z * se,
        residual=residual,
        residual_allowed=allowed,
        rows=tuple(int(i) for i in row_off.nonzero().flatten().tolist()),
        tokens=tokens,
    )
