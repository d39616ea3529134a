"""Rank 0's side of a cell: the export as ``peft`` loads it, against Megatron's logits.

The exported files are checked first (``compat.checks.peft_files``); then the HF base model and
``peft.PeftModel`` are built from the files alone, their logits compared with Megatron's at every
position, the adapter's effect shown to exceed the tolerance, and every merged form of the
adapter compared with the unmerged one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compat.checks.compare import (
    Bounds,
    Tolerance,
    adapter_tolerance,
    bounds_from_bases,
    compare,
    effect_problem,
    merged_tolerance,
    token_agreement,
    torch_dtype,
)
from compat.checks.findings import CheckFailed
from compat.checks.peft_files import check_adapter_dir, check_loaded_by_peft, compare_exports
from compat.checks.problems import Problem
from compat.checks.upstream import describe, first_line, upstream_frame
from compat.declare.adapters import get_adapter
from compat.declare.cells import Cell
from compat.declare.families import get_family
from compat.rank.activations import capture_hf, first_divergence, input_ids, load_megatron
from compat.rank.export import MEGATRON_MERGED, MERGED_EXPORT, MERGED_WEIGHTS, PEFT_MERGED
from compat.rank.merged_weights import base_state, merged_weights
from compat.rank.oracle_verdict import oracle_verdict
from compat.rank.paths import CellPaths
from compat.rank.peft_oracle import PeftRecorder
from compat.rank.route_replay import Paired, pair_routing, replay_forward
from compat.rank.routing import capture_hf_routing, hf_forward

__all__ = ["adapter_problems", "compare_with_peft", "hf_model"]

_WHERE = ("sequence", "position", "token")


def adapter_problems(cell: Cell, paths: CellPaths, reference: bool) -> list[Problem]:
    """What is wrong in the exported files themselves (and against the export at the save layout)."""
    family = get_family(cell.family)
    adapter = paths.where(paths.adapter)  # the directory the exporter wrote
    files = check_adapter_dir(adapter, get_adapter(cell.adapter), paths.hf, family.hf_modules)
    problems = [Problem("files", p) for p in files]
    if reference and (adapter / "adapter_model.safetensors").exists():
        try:
            problems += [Problem("reshard", p) for p in compare_exports(adapter, paths.where(paths.reference_adapter))]
        except Exception as exc:  # an unreadable file is already a file problem; say why this one is not run
            why = f"the export cannot be compared with the save layout's: {describe(exc)}"
            problems.append(Problem("reshard", why))
    return problems


def compare_with_peft(
    cell: Cell, paths: CellPaths, reference: bool, skipped: dict[str, str], device: Any = "cpu"
) -> dict[str, Any]:
    """Metrics of the comparison; :class:`CheckFailed` (with the metrics and every problem) if any check fails.

    Every check whose inputs exist runs: a file problem does not stop peft from loading the export,
    nor the logits from being compared. Only peft refusing the export stops what needs the loaded model.
    ``skipped``: merged forms the Megatron side could not produce, with the reason. The HF side runs
    on the cell's own device (a GPU cell's models load where a serving engine would load them: and
    some HF models take GPU-only kernels whenever their package is installed, Qwen3-Next's fla).
    """
    from peft import PeftModel

    problems = adapter_problems(cell, paths, reference)
    dtype = torch_dtype(cell.dtype)
    hf = hf_model(paths.hf, dtype, device)
    ids = input_ids(get_family(cell.family).dims.vocab_size, device)
    with torch.no_grad():
        base = hf_forward(hf, ids)
    base_logits = base["logits"]
    metrics: dict[str, Any] = {}
    found, bounds = _base_problems(cell, paths, base, metrics, lambda meg: replay_forward(hf, ids, meg), device)
    problems += found
    tol = bounds.adapted if bounds else adapter_tolerance(cell.dtype, None)
    metrics["tolerance"]["adapter_allowed"] = str(tol)
    base_weights = base_state(hf, skipped)  # before peft merges into them
    try:
        peft_model = PeftModel.from_pretrained(hf, str(paths.where(paths.adapter))).eval()
    except Exception as exc:  # peft refusing the files is this cell's finding, not a crash
        problems.append(
            Problem(
                "peft load",
                f"peft.PeftModel.from_pretrained refused the export: {type(exc).__name__}: "
                f"{first_line(exc, 600, lines=3)} at {upstream_frame(exc)}",
            )
        )
        problems += oracle_verdict(paths, None, metrics)
        raise CheckFailed(problems, metrics, _NEED_PEFT) from exc
    problems += [Problem("peft placement", p) for p in check_loaded_by_peft(peft_model, paths.where(paths.adapter))]
    hf_acts: dict[str, torch.Tensor] = {}
    hooks = capture_hf(peft_model, hf_acts) + capture_hf_routing(peft_model, hf_acts, ids)
    with torch.no_grad(), PeftRecorder(peft_model) as in_flight:
        peft_logits = peft_model(ids).logits
    for h in hooks:
        h.remove()
    problems += oracle_verdict(paths, _peft_entries(in_flight, paths, cell.dtype, device), metrics)
    meg = load_megatron(paths, "adapter", device)
    unmerged = {**hf_acts, "logits": peft_logits}
    p = _pair(cell, meg, unmerged, "adapter", metrics, lambda: (meg, replay_forward(peft_model, ids, meg)))
    cmp = compare(meg["logits"], p.second["logits"], tol, p.keep)
    # bf16 rounding noise scales with the logits' size, and the adapter changes it: kept beside base_rms
    metrics["tolerance"]["adapter_rms"] = float(peft_logits.double().pow(2).mean().sqrt())
    compared = cmp.total > 0  # nothing is left where every sequence flips at its first position
    metrics.update(
        max_abs_diff=cmp.max_abs_diff if compared else None,
        max_rel_diff=cmp.max_rel_diff if compared else None,
        adapter_effect=float((peft_logits.double() - base_logits.double()).abs().max()),
    )
    if cell.dtype != "fp32":
        metrics["top1_agreement"] = token_agreement(meg["logits"], peft_logits)
    if not cmp.ok:
        where = first_divergence(meg, hf_acts, tol)
        problems.append(
            Problem(
                "logits",
                cmp.message("Megatron logits differ from peft.PeftModel logits", _WHERE)
                + (f"; first divergence: {where}" if where else "")
                + p.clause
                + "".join(f"; {r}" for r in p.problems),
            )
        )
    else:
        problems += [Problem("routing", r) for r in p.problems]
    effect = effect_problem(base_logits, peft_logits, tol)
    if effect:
        problems.append(Problem("adapter effect", effect))
    metrics["merged"] = _merged_forms(
        cell, peft_model, ids, paths, tol, unmerged, skipped, problems, metrics, device, base_weights
    )
    if problems:
        raise CheckFailed(problems, metrics)
    return metrics


def _peft_entries(recorder: PeftRecorder, paths: CellPaths, dtype: str, device: Any) -> list[dict[str, Any]] | None:
    """peft's in-flight entries, judged against the files (None where the files cannot be read: the
    file checks say why, and the coverage shows the oracle did not run)."""
    from compat.checks.adapter_files import FileAdapter

    try:
        files = FileAdapter.read(paths.where(paths.adapter), device)
    except Exception:  # an unreadable export is the files check's finding
        return None
    return recorder.judge(files, dtype)


_BASES_DIFFER = "the base models differ before any adapter: Megatron with its adapters off vs the HF model"
_NEED_PEFT = "peft placement, logits, adapter effect, merged forms (they need the model peft did not load)"


def _base_problems(
    cell: Cell, paths: CellPaths, base: dict[str, torch.Tensor], metrics: dict[str, Any], replay: Any, device: Any
) -> tuple[list[Problem], Bounds | None]:
    """Megatron with its adapters switched off must compute the HF base model: else a mismatch
    below is the bridge's model conversion, not the adapter's export. Records the drift measured
    and allowed in ``metrics["tolerance"]`` (``compat.checks.compare``: the adapted logits' bound derives from it).
    ``replay(meg)``: the HF base forward with Megatron's routing (``compat.rank.route_replay``)."""
    if not paths.all_activations("base"):
        metrics.setdefault("skipped_checks", {})["base model"] = (
            "this megatron-bridge's PEFT has no enable/disable_adapter_layers: Megatron's base model was not run"
        )
        metrics["tolerance"] = {"base_drift": None, "derivation": "no base-model forward: the table"}
        return [], None
    dims = get_family(cell.family).dims
    meg, problems = load_megatron(paths, "base", device), []
    p = _pair(cell, meg, base, "base", metrics, lambda: (meg, replay(meg)))
    base_logits = p.second["logits"]
    bounds = bounds_from_bases(cell.dtype, dims.num_layers, dims.hidden_size, meg["logits"], base_logits, p.keep)
    c = bounds.drift
    metrics["tolerance"] = {
        "base_drift": c.max_abs_diff,
        "base_allowed": str(bounds.base),
        "base_rms": float(base_logits.double().pow(2).mean().sqrt()),
        "base_drift_modelled": bounds.modelled,
        "adapter_allowed": str(bounds.adapted),
        "derivation": "base: max(table, NOISE_SAFETY x sqrt(L) x u x rms x sqrt(2 ln N)); "
        "adapter: max(table, ADAPTER_GROWTH x max(min(base drift, base bound), modelled)) (compat/checks/compare.py)",
    }
    if not c.ok:
        problems.append(
            Problem("base model", c.message(_BASES_DIFFER, _WHERE) + p.clause + "".join(f"; {r}" for r in p.problems))
        )
    else:
        problems += [Problem("routing", r) for r in p.problems]
    return problems, bounds


def _pair(cell: Cell, first: dict, second: dict, pair: str, metrics: dict[str, Any], replay: Any = None) -> Paired:
    """``pair_routing`` at the cell's dtype and width."""
    return pair_routing(first, second, pair, cell.dtype, get_family(cell.family).dims.hidden_size, metrics, replay)


def hf_model(directory: Path, dtype: torch.dtype, device: Any) -> Any:
    """An HF checkpoint as a model in ``dtype``, its weights read straight onto ``device``: loaded on
    the host and then moved, a 1.7B-shaped fp32 model costs two full copies (issue 19)."""
    from transformers import AutoModelForCausalLM

    on = torch.device(device)
    placed = {"device_map": str(on)} if on.type != "cpu" else {}
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **placed).eval()


def _merged_forms(
    cell: Cell,
    peft_model: Any,
    ids: torch.Tensor,
    paths: CellPaths,
    tol: Tolerance,
    unmerged: dict[str, torch.Tensor],
    skipped: dict[str, str],
    problems: list[Problem],
    metrics: dict[str, Any],
    device: Any,
    base_weights: dict[str, torch.Tensor] | None,
) -> dict[str, dict[str, Any]]:
    """Each merged form: compared with the unmerged adapter's logits (pass/fail), or skipped with why.

    ``unmerged``: peft's unmerged forward (logits and routing). A merged weight is rounded once where
    the unmerged forward adds two products, so at real widths an MoE router can break a near-tie the
    other way: each form's routing is compared with peft's like the two sides' (``_routing``), and
    its logits before each sequence's first flip.
    """
    dtype = torch_dtype(cell.dtype)
    tol = merged_tolerance(cell.dtype, tol, get_family(cell.family).dims.num_layers, unmerged["logits"])
    metrics["tolerance"]["merged_allowed"] = str(tol)
    out: dict[str, dict[str, Any]] = {
        name: {"status": "skipped", "max_abs_diff": None, "reason": why} for name, why in skipped.items()
    }

    def judge(name: str, acts: dict[str, torch.Tensor], replay: Any) -> None:
        p = _pair(cell, acts, unmerged, name, metrics, replay)
        c = compare(p.first["logits"], p.second["logits"], tol, p.keep)
        out[name] = {"status": "pass" if c.ok else "fail", "max_abs_diff": c.max_abs_diff, "reason": ""}
        if not c.ok:
            out[name]["reason"] = c.message(f"{name} logits differ from peft.PeftModel logits", _WHERE) + p.clause
            out[name]["reason"] += "".join(f"; {r}" for r in p.problems)
            problems.append(Problem(name, out[name]["reason"]))
            return
        problems.extend(Problem("routing", r) for r in p.problems)
        if p.problems:  # a pass would vouch for what the routing problem says was not measured
            out[name] = {
                "status": "fail",
                "max_abs_diff": c.max_abs_diff if c.total else None,
                "reason": p.problems[-1],
            }

    exported = None
    with torch.no_grad():
        if MERGED_EXPORT not in skipped:
            exported = hf_model(paths.merged, dtype, device)  # its weights are compared below too
            judge(MERGED_EXPORT, hf_forward(exported, ids), lambda: (replay_forward(exported, ids, unmerged), unmerged))
        if MEGATRON_MERGED not in skipped:  # before peft merges: a replay recomputes peft's unmerged forward
            meg = load_megatron(paths, "merged", device)
            judge(MEGATRON_MERGED, meg, lambda: (meg, replay_forward(peft_model, ids, meg)))
        merged_model = peft_model.merge_and_unload()  # last: it edits the model
        judge(
            PEFT_MERGED, hf_forward(merged_model, ids), lambda: (replay_forward(merged_model, ids, unmerged), unmerged)
        )
    if exported is not None:
        out[MERGED_WEIGHTS] = merged_weights(merged_model, exported, base_weights, paths, dtype, device)
        if out[MERGED_WEIGHTS]["status"] != "pass":
            problems.append(Problem(MERGED_WEIGHTS, out[MERGED_WEIGHTS]["reason"]))
    return out
