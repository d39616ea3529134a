"""Rank 0's reading of the per-module oracles: their problems, their measures and the cell's coverage.

The Megatron-side oracles ran on every rank and rank 0 wrote their entries (``delta-oracle.json``,
``forward-oracle.json``); peft's in-flight entries come from the HF side. Here they become the
cell's problems (``compat.checks.oracles``), ``metrics["oracles"]`` (how many weights each judged,
its worst measure) and ``metrics["coverage"]``; weights no oracle judged become the skipped check
``oracle coverage``, which every view of skipped checks shows and the gate compares.
"""

from __future__ import annotations

import json
import math
from typing import Any

from compat.checks.oracles import AT_REST, MEGATRON_FLIGHT, PEFT_FLIGHT, at_rest_problems, coverage, flight_problems
from compat.checks.problems import Problem
from compat.rank.paths import CellPaths

__all__ = ["COVERAGE", "oracle_verdict"]

COVERAGE = "oracle coverage"


def _read(path: Any) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def oracle_verdict(paths: CellPaths, peft: list[dict[str, Any]] | None, metrics: dict[str, Any]) -> list[Problem]:
    """The oracles' problems; their measures and the coverage go into ``metrics``."""
    rest = _read(paths.delta_oracle)
    flight = _read(paths.forward_oracle) or {}
    megatron = flight.get("entries")
    problems = at_rest_problems(rest) + flight_problems(megatron, MEGATRON_FLIGHT) + flight_problems(peft, PEFT_FLIGHT)
    data, uncovered, skipped = coverage(rest, megatron, peft, flight.get("unjudged_wrappers"))
    metrics["coverage"] = data
    weights = data.get("judged", {})  # per HF weight, as the coverage counts them (not per shard or call)
    metrics["oracles"] = {
        AT_REST: _rest_measures(rest, weights.get(AT_REST, 0)),
        MEGATRON_FLIGHT: _flight_measures(megatron, weights.get(MEGATRON_FLIGHT, 0)),
        PEFT_FLIGHT: _flight_measures(peft, weights.get(PEFT_FLIGHT, 0)),
    }
    if skipped:
        metrics.setdefault("skipped_checks", {})[COVERAGE] = skipped
    return problems + uncovered


def _rest_measures(rest: dict[str, Any] | None, weights: int) -> dict[str, Any]:
    if rest is None:
        return {"status": "not run"}
    if rest.get("status") != "ran":
        return {"status": "skipped", "reason": rest.get("reason", "")}
    judged = [e for e in rest["entries"] if e.get("judged")]
    worst = max((float(e["rel"]) for e in judged), default=0.0)
    return {"status": "ran", "judged": weights, "max_rel_diff": worst if math.isfinite(worst) else None}


def _flight_measures(entries: list[dict[str, Any]] | None, weights: int) -> dict[str, Any]:
    if entries is None:
        return {"status": "not run"}
    judged = [e for e in entries if e.get("judged") and "gain" in e]
    gains = [abs(e["gain"] - 1) for e in judged if math.isfinite(e["gain"])]
    residuals = [e["residual"] for e in judged if math.isfinite(e["residual"])]
    return {
        "status": "ran",
        "judged": weights,
        "max_gain_error": max(gains, default=0.0),
        "max_residual": max(residuals, default=0.0),
    }
