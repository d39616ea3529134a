"""The at-rest oracle: the delta the export stores for each weight is the one Megatron's adapter stores.

Logits blur a layout fault in the noise of two forward passes; weights do not. The exported HF
delta of every weight (``scaling * lora_B @ lora_A`` from the files alone, ``compat.checks.
adapter_files``) is mapped into Megatron's layout by the bridge's *import* conversion, the
``hf_to_megatron`` of the weight's param mapping: the very conversion that loaded the base model,
which the base-model logits check validates against the HF model. The conversion is linear, so it
maps a delta as it maps a weight. The result is compared, shard by shard on the rank that holds it,
with Megatron's delta from its adapter's stored factors (``compat.rank.adapted_weights``), both in
fp32. The export direction (``megatron_to_hf``, QKV split by the same code the adapter export uses)
is not used: a fault there would move both sides alike.

A mapping casts what it converts to the parameter's dtype; in bf16 the HF delta is therefore
converted as three bf16 pieces that sum to it exactly (8 + 8 + 8 bits of fp32's 24) and summed back.

What it does not see: how either side applies its delta at forward time (``compat.rank.
forward_oracle`` and ``compat.rank.peft_oracle`` do), and DoRA's magnitudes (the file check does).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from compat.checks.adapter_files import FileAdapter, LazyDeltas
from compat.checks.oracles import DELTA_RTOL, ranges
from compat.checks.peft_files import _base_weights
from compat.rank.adapted_weights import AdaptedWeight
from compat.rank.paths import CellPaths, write_json_atomic

__all__ = ["DELTA_RTOL", "compare_delta", "imported_delta", "run_oracle"]


def imported_delta(mapping: Any, hf: Any, module: Any, dtype: torch.dtype) -> torch.Tensor | None:
    """``hf`` (a tensor, or a dict of tensors for a fused mapping) in Megatron's local layout, exactly:
    the conversion casts to ``dtype``, so a non-fp32 dtype converts bf16 pieces and sums them."""
    pieces = 1 if dtype == torch.float32 else 3
    rest = hf
    total = None
    for _ in range(pieces):
        part = _map(rest, lambda t: t.to(dtype))
        rest = _map2(rest, part, lambda t, p: t - p.float())
        got = mapping.hf_to_megatron(part, module)
        if got is None:
            return None
        total = got.float() if total is None else total + got.float()
    return total


def _map(x: Any, fn: Any) -> Any:
    return {k: fn(v) for k, v in x.items()} if isinstance(x, dict) else fn(x)


def _map2(x: Any, y: Any, fn: Any) -> Any:
    return {k: fn(v, y[k]) for k, v in x.items()} if isinstance(x, dict) else fn(x, y)


def compare_delta(got: torch.Tensor | None, want: torch.Tensor) -> dict[str, Any]:
    """One weight's imported HF delta against Megatron's: ok, the ratio to its largest delta, the rows."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    if got is None:
        return {"ok": False, "rel": math.inf, "finding": "the import conversion gave this rank no shard"}
    if got.shape != want.shape:
        return {"ok": False, "rel": math.inf, "finding": f"shape {tuple(got.shape)}, Megatron's {tuple(want.shape)}"}
    diff = (got.to(want.device) - want).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if scale == 0.0:
        ok = worst == 0.0
        finding = "" if ok else f"Megatron adapts nothing here; the export's max |delta| {worst:.3e}"
        return {"ok": ok, "rel": worst, "finding": finding}
    rel = worst / scale
    if rel <= DELTA_RTOL:  # NaN fails
        return {"ok": True, "rel": rel, "finding": ""}
    if float(got.abs().max()) == 0.0:
        return {"ok": False, "rel": rel, "finding": "the export leaves it unchanged", "missing": True}
    rows = torch.nonzero(diff.amax(dim=1) > DELTA_RTOL * scale).flatten().tolist()
    finding = (
        f"rows {ranges(rows)} of {want.shape[0]}, max |diff| {worst:.3e} = {rel:.2e} of its largest delta {scale:.3e}"
    )
    return {"ok": False, "rel": rel, "finding": finding}


def run_oracle(bridge: Any, weights: list[AdaptedWeight], paths: CellPaths, comm: Any, device: Any) -> None:
    """Collective over the cell's ranks: each rank judges its shards; rank 0 writes every rank's entries."""
    adapter_dir = paths.where(paths.adapter)
    try:
        files = FileAdapter.read(adapter_dir, device)
        why = ""
    except Exception as exc:  # unreadable files: peft_files names what is wrong with them
        files, why = None, f"the exported files could not be read ({type(exc).__name__}: {str(exc)[:200]})"
    whys = comm.gather(why)
    if any(whys):  # every rank skips the conversion's collectives alike
        if comm.rank == 0:
            write_json_atomic(paths.delta_oracle, {"status": "skipped", "reason": next(w for w in whys if w)})
        return
    assert files is not None  # every rank read them (whys are all empty)
    state = LazyDeltas(files, _base_weights(paths.hf), device)
    model_bridge = bridge._model_bridge
    entries = []
    for w in weights:
        entry = {"name": w.name, "hf": list(w.hf), "where": w.where()}
        try:
            hf = model_bridge.maybe_modify_loaded_hf_weight(w.mapping.hf_param, state)
            got = imported_delta(w.mapping, hf, w.module, w.weight.dtype)
            entries.append({**entry, "judged": True, **compare_delta(got, w.delta())})
        except KeyError as exc:  # the base checkpoint has no such weight: the base check fails first
            entries.append({**entry, "judged": False, "why": f"no HF weight {exc} to map"})
        except Exception as exc:  # the conversion refuses a delta where it loaded the weight: say so, judge none
            why = f"the import conversion raised {type(exc).__name__}: {str(exc)[:200]}"
            entries.append({**entry, "judged": False, "why": why})
    every = [e for rank_entries in comm.gather(entries) for e in rank_entries]
    if comm.rank != 0:
        return
    mapped = {h for e in every for h in e["hf"]}
    extra = sorted(f"{m}.weight" for m in files.factors if f"{m}.weight" not in mapped and _moves(files, m))
    write_json_atomic(paths.delta_oracle, {"status": "ran", "entries": every, "extra": extra})


def _moves(files: FileAdapter, module: str) -> bool:
    return float(files.delta(module).abs().max()) > 0
