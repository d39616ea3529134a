"""What the per-module oracles found, and which adapted weight each of them judged (coverage).

Three oracles judge each adapted weight apart from the logits: at rest (the export's delta mapped
by the bridge's import conversion against Megatron's stored delta), in flight on Megatron's side
and in flight on peft's side (each module's contribution in the forward against its stored
factors). Each reports entries ``{name, hf, where, judged, ok, finding | why}``, one per weight (and
shard or call); here they become one problem per oracle and kind, naming every weight in
``Problem.tensors``, and the coverage: per HF weight, which oracles judged it. A weight no oracle
judged is a skipped check; adapters present and no weight judged is a problem.
"""

from __future__ import annotations

from typing import Any

from compat.checks.problems import Problem

__all__ = [
    "AT_REST",
    "DELTA_RTOL",
    "MEGATRON_FLIGHT",
    "ORACLES",
    "PEFT_FLIGHT",
    "at_rest_problems",
    "coverage",
    "flight_problems",
    "ranges",
]

AT_REST = "delta at rest"
# The at-rest oracle's bound (compat.rank.delta_oracle): both sides multiply the same stored values in fp32,
# in their own order (a rank-r sum: about r * 2^-24 of the terms' size): measured 0 to 3e-7 of the tensor's
# largest delta on the toy matrix. Allowed: 1e-5 of it. A layout fault moves rows by the delta's own size.
DELTA_RTOL = 1e-5
MEGATRON_FLIGHT = "in flight, Megatron"
PEFT_FLIGHT = "in flight, peft"
ORACLES = (AT_REST, MEGATRON_FLIGHT, PEFT_FLIGHT)
_SHOWN = 3


def _worst(entries: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Entries merged by weight name (TP shards, replicas, calls): failing if any is, the worst kept."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        if not e.get("judged"):
            continue
        was = out.get(e["name"])
        if (
            was is None
            or (was.get("ok") and not e.get("ok"))
            or (was.get("ok") == e.get("ok") and e.get(key, 0) > was.get(key, 0))
        ):
            out[e["name"]] = e
    return out


def _named(e: dict[str, Any]) -> str:
    """``decoder.layers.1.self_attention.linear_qkv.weight = model.layers.1.self_attn.{q,k,v}_proj.weight
    (layer 1, finding)``: Megatron's name and the HF weights it maps to, where they differ."""
    hf = [h for h in e.get("hf") or [] if h != e["name"]]
    also = f" = {', '.join(hf)}" if hf else ""
    where = f"{e['where']}, " if e.get("where") else ""
    return f"{e['name']}{also} ({where}{e['finding']})"


def at_rest_problems(result: dict[str, Any] | None) -> list[Problem]:
    """The at-rest oracle's entries as problems (none when it did not run: coverage says so)."""
    if not result or result.get("status") != "ran":
        return []
    merged = _worst(result["entries"], "rel")
    bad = sorted((e for e in merged.values() if not e["ok"]), key=lambda e: -float(e["rel"]))
    missing, differ = [e for e in bad if e.get("missing")], [e for e in bad if not e.get("missing")]
    out = []
    if differ:
        shown = "; ".join(_named(e) for e in differ[:_SHOWN])
        out.append(Problem(
            AT_REST,
            f"the exported delta, mapped into Megatron's layout by the bridge's import conversion, differs from "
            f"Megatron's stored delta in {len(differ)} of {len(merged)} weights "
            f"(fp32, up to {DELTA_RTOL:g} of the largest delta allowed): {shown}",
            tensors=tuple(sorted(e["name"] for e in differ)),
        ))  # fmt: skip
    if missing:
        shown = "; ".join(_named({**e, "finding": ""}).replace(", )", ")").replace(" ()", "") for e in missing[:_SHOWN])
        out.append(Problem(
            AT_REST,
            f"Megatron adapts {len(missing)} weights the export leaves unchanged, e.g. {shown}",
            tensors=tuple(sorted(e["name"] for e in missing)),
        ))  # fmt: skip
    extra = result.get("extra") or []
    if extra:
        out.append(Problem(
            AT_REST,
            f"the export changes {len(extra)} weights Megatron does not adapt, e.g. {', '.join(extra[:_SHOWN])}",
            tensors=tuple(extra),
        ))  # fmt: skip
    return out


def flight_problems(entries: list[dict[str, Any]] | None, side: str) -> list[Problem]:
    """One side's in-flight entries as one problem naming every weight whose contribution is off."""
    if not entries:
        return []
    merged = _worst(entries, "residual")
    bad = [e for e in merged.values() if not e["ok"]]  # in model order: the first is where it starts
    if not bad:
        return []
    shown = "; ".join(_named(e) + (f", rows {_rows(e)}" if e.get("rows") else "") for e in bad[:_SHOWN])
    return [Problem(
        "forward oracle",
        f"{side}: {len(bad)} of {len(merged)} adapted weights add another contribution in the forward pass than their "
        f"stored adapter's scale * x A^T B^T: {shown}",
        tensors=tuple(sorted(e["name"] for e in bad)),
    )]  # fmt: skip


def _rows(e: dict[str, Any]) -> str:
    return f"{ranges(e['rows'])} of {e.get('tokens', '?')}"


def ranges(rows: list[int]) -> str:
    """``0-127, 256-383``: indices as runs."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    shown = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs[:4])
    return shown + (f" (+{len(runs) - 4} more runs)" if len(runs) > 4 else "")


def coverage(
    at_rest: dict[str, Any] | None,
    megatron: list[dict[str, Any]] | None,
    peft: list[dict[str, Any]] | None,
    unjudged_wrappers: dict[str, str] | None = None,
) -> tuple[dict[str, Any], list[Problem], str]:
    """(``metrics["coverage"]``, problems, the skipped check's reason or "").

    Keyed by HF weight: a Megatron weight judged counts for every HF weight it maps to (q, k and v
    of a fused QKV). A weight no oracle judged is listed with why each oracle did not.
    """
    by_weight: dict[str, set[str]] = {}
    why: dict[str, dict[str, str]] = {}

    def add(entries: list[dict[str, Any]], oracle: str) -> None:
        for e in entries:
            for h in e["hf"]:
                seen = by_weight.setdefault(h, set())
                if e.get("judged"):
                    seen.add(oracle)
                else:
                    why.setdefault(h, {})[oracle] = e.get("why", "")

    rest_entries = (at_rest or {}).get("entries") or []
    add(rest_entries, AT_REST)
    add(megatron or [], MEGATRON_FLIGHT)
    add(peft or [], PEFT_FLIGHT)
    for h in (at_rest or {}).get("extra") or []:
        by_weight.setdefault(h, set())
    if at_rest and at_rest.get("status") == "skipped":
        for h in by_weight:
            why.setdefault(h, {})[AT_REST] = at_rest.get("reason", "")
    unjudged = {h: "; ".join(f"{o}: {w}" for o, w in sorted(why.get(h, {}).items())) or "no oracle reached it"
                for h, seen in by_weight.items() if not seen}  # fmt: skip
    for module, reason in (unjudged_wrappers or {}).items():
        unjudged[module] = reason
    data = {
        "weights": len(by_weight) + len(unjudged_wrappers or {}),
        "judged": {o: sum(o in s for s in by_weight.values()) for o in ORACLES},
        "unjudged": dict(sorted(unjudged.items())),
        "by_weight": {h: sorted(s) for h, s in sorted(by_weight.items())},
    }
    problems = []
    if data["weights"] and not any(by_weight.values()):
        problems.append(
            Problem(
                "oracle coverage",
                f"adapters are present and no oracle judged any of the {data['weights']} adapted weights",
            )
        )
    skipped = ""
    if unjudged:
        names = sorted(unjudged)
        first = f"{names[0]} ({unjudged[names[0]]})"
        skipped = f"{len(names)} of {data['weights']} adapted weights judged by no oracle, e.g. {first}"
    return data, problems, skipped
