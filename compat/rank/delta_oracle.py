"""The exact per-module check: the weight delta the export applies in HF is the one Megatron applies.

Logits blur a layout fault in the noise of two forward passes (in bf16 a wrong QKV split moved the
toy's logits by 1.07e-2 against 5.9e-3 clean); weights do not. For every LoRA-wrapped Megatron
module the delta ``alpha / dim * B @ A`` is computed in fp32 from the adapter's stored values (the
TP shards gathered as the bridge's ``LoRAMerge.merge`` gathers them, ``megatron/bridge/peft/
lora_merge.py``), put in place of the base weight, and mapped to HF names and layout by the bridge's
*base weight* conversion (``export_hf_weights`` without adapter merging: the conversion the
base-model logits check validates). The HF delta is ``scaling * lora_B @ lora_A`` from the exported
files alone (``lora_alpha / r``, ``rank_pattern``/``alpha_pattern``, rsLoRA), also in fp32. The two
are compared tensor by tensor; a difference names the tensor, its rows and the size.

What it assumes, and the logits checks catch: that each side applies its delta at forward time
as written (a wrong scale in Megatron's forward, a peft that places a tensor on the wrong module).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from compat.checks.peft_files import _pattern_matches
from compat.rank import bridge_api
from compat.rank.paths import CellPaths, write_json_atomic

__all__ = ["DELTA_RTOL", "check_deltas", "hf_deltas", "megatron_deltas", "oracle_problems", "run_oracle"]

# Both sides multiply the same stored values in fp32, in their own order (a rank-r sum: about
# r * 2^-24 of the terms' size): measured 0 to 3e-7 of the tensor's largest delta on the toy
# matrix. Allowed: 1e-5 of it. A layout fault moves rows by the delta's own size (ratio ~1).
DELTA_RTOL = 1e-5

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _delta(adapter: Any, out_rows: int, lin: torch.Tensor, lout: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``alpha / dim * B @ A`` in fp32, gathering the TP-split factor like ``LoRAMerge``."""
    import torch.distributed as dist

    lin, lout = lin.detach().float(), lout.detach().float()
    group = getattr(adapter, "tp_group", None)
    if not hasattr(adapter, "tp_group") and dist.is_initialized():  # 0.4.x: LoRAMerge takes parallel state's
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    if size > 1 and lin.shape[0] * size == adapter.dim and lout.shape[1] == adapter.dim:
        lin = torch.cat(_gather(lin, group, size), dim=0)  # column parallel: A split over the rank
    elif size > 1 and lout.shape[0] * size == out_rows:
        lout = torch.cat(_gather(lout, group, size), dim=0)  # row parallel: B split over the outputs
    return (adapter.alpha / adapter.dim) * (lout @ lin)


def _gather(t: torch.Tensor, group: Any, size: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _swaps(model: list) -> tuple[list[tuple[torch.nn.Parameter, torch.Tensor]], str | None]:
    """(base parameter, fp32 delta) for every adapted weight; or why no delta is defined here."""
    from megatron.bridge.peft.lora_layers import LoRALinear

    wrappers = [m for chunk in model for m in chunk.modules() if hasattr(m, "adapter") and hasattr(m, "to_wrap")]
    other = sorted({type(m).__name__ for m in wrappers if not isinstance(m, LoRALinear)})
    if other:
        return [], f"no delta oracle for {', '.join(other)} (LoRALinear only)"
    swaps = []
    for m in wrappers:
        a, base = m.adapter, m.to_wrap
        if hasattr(base, "weight"):
            swaps.append((base.weight, _delta(a, base.weight.shape[0], a.linear_in.weight, a.linear_out.weight)))
            continue
        if getattr(a, "expert_tp_group", None) is not None and torch.distributed.get_world_size(a.expert_tp_group) > 1:
            return [], "no delta oracle for grouped-expert adapters under expert tensor parallelism"
        lin, lout = a.linear_in.weight, a.linear_out.weight
        for i in range(base.num_gemms):  # TE grouped experts: weight0..N-1, one adapter or one slice each
            w = getattr(base, f"weight{i}")
            a_i, b_i = (lin[i] if lin.dim() == 3 else lin), (lout[i] if lout.dim() == 3 else lout)
            swaps.append((w, _delta(a, w.shape[0], a_i, b_i)))
    return swaps, None


def megatron_deltas(
    bridge: Any, model: list, cpu: bool = True
) -> tuple[Iterator[tuple[str, torch.Tensor]], str | None]:
    """Collective: {HF weight name: fp32 delta} as the bridge's base conversion lays Megatron's out.

    The base weights hold the deltas only while the returned iterator runs; it puts them back.
    """
    swaps, why = _swaps(model)
    if why:
        return iter(()), why

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        kept = [(p, p.data) for p, _ in swaps]
        try:
            for p, d in swaps:
                p.data = d
            yield from bridge_api.export_base_weights(bridge, model, lambda name: "to_wrap.weight" in name, cpu)
        finally:
            for p, data in kept:
                p.data = data

    return stream(), None


def hf_deltas(adapter_dir: Path, device: Any = "cpu") -> dict[str, torch.Tensor]:
    """{HF weight name: fp32 ``scaling * lora_B @ lora_A``} from the exported files alone, as peft scales."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"), device=str(device))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = t
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["B"].shape[1] != ab["A"].shape[0]:
            continue  # peft_files reports unpaired or misshapen tensors
        r = _pattern_value(config, "rank_pattern", module, config["r"])
        alpha = _pattern_value(config, "alpha_pattern", module, config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[f"{module}.weight"] = scaling * (ab["B"].float() @ ab["A"].float())
    return out


def _pattern_value(config: dict[str, Any], field: str, module: str, default: float) -> float:
    for pattern, value in (config.get(field) or {}).items():
        if _pattern_matches(pattern, module):
            return value
    return default


def check_deltas(megatron: Iterator[tuple[str, torch.Tensor]], hf: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Each Megatron delta against the export's (zero where the export adapts nothing): problems and measures."""
    differ, missing, seen, worst = [], [], set(), 0.0
    for name, want in megatron:
        seen.add(name)
        want = want.float()
        got = hf.get(name)
        if got is None:
            if float(want.abs().max()) > 0:
                missing.append(name)
            continue
        if got.shape != want.shape:
            differ.append((math.inf, name, f"shape {tuple(got.shape)}, Megatron's {tuple(want.shape)}"))
            continue
        diff = (got.to(want.device) - want).abs()
        scale = float(want.abs().max())
        rel = float(diff.max()) / scale if scale > 0 else float(diff.max())
        worst = max(worst, rel)
        if not rel <= DELTA_RTOL:  # NaN fails
            rows = torch.nonzero(diff.amax(dim=1) > DELTA_RTOL * scale).flatten().tolist()
            differ.append((rel, name, f"rows {_ranges(rows)} of {want.shape[0]}, max |diff| {float(diff.max()):.3e}"
                                      f" = {rel:.2e} of its largest delta {scale:.3e}"))  # fmt: skip
    extra = sorted(n for n in set(hf) - seen if float(hf[n].abs().max()) > 0)
    problems = []
    if differ:
        shown = "; ".join(f"{n} ({what})" for _, n, what in sorted(differ, key=lambda d: -d[0])[:3])
        problems.append(
            f"the exported adapter's delta differs from Megatron's in {len(differ)} of {len(seen)} weights "
            f"(fp32 from the stored values, up to {DELTA_RTOL:g} of the largest delta allowed): {shown}"
        )
    if missing:
        problems.append(f"Megatron adapts {len(missing)} weights the export leaves unchanged, e.g. {missing[:2]}")
    if extra:
        problems.append(f"the export changes {len(extra)} weights Megatron does not adapt, e.g. {extra[:2]}")
    return {"problems": problems, "weights": len(seen), "max_rel_diff": worst}


def _ranges(rows: list[int]) -> str:
    """``0-127, 256-383``: row indices as runs."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    shown = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs[:4])
    return shown + (f" (+{len(runs) - 4} more runs)" if len(runs) > 4 else "")


def run_oracle(bridge: Any, model: list, paths: CellPaths, rank: int, device: Any = "cpu") -> None:
    """Collective over the cell's ranks; rank 0 compares as the deltas stream and writes the verdict.
    On a GPU cell both sides stay on the GPU (at 1.7B shapes the CPU took 17-25 s of the cell)."""
    deltas, why = megatron_deltas(bridge, model, cpu=str(device) == "cpu")
    if rank != 0:
        for _ in deltas:
            pass
        return
    try:
        hf = hf_deltas(paths.where(paths.adapter), device)
    except Exception as exc:  # unreadable files: peft_files names what is wrong with them
        for _ in deltas:
            pass
        why = f"the exported files could not be read for the delta oracle ({type(exc).__name__})"
    result = {"status": "skipped", "reason": why} if why else {"status": "ran", **check_deltas(deltas, hf)}
    write_json_atomic(paths.delta_oracle, result)


def oracle_problems(paths: CellPaths, metrics: dict[str, Any]) -> list[str]:
    """What the oracle found (rank 0, HF side); its measures go into ``metrics['delta_oracle']``."""
    if not paths.delta_oracle.exists():
        return []  # a phase that exports no adapter (the save launch of a resharding cell)
    result = json.loads(paths.delta_oracle.read_text())
    metrics["delta_oracle"] = {k: v for k, v in result.items() if k != "problems"}
    return list(result.get("problems", []))
