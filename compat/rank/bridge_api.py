"""The megatron-bridge calls a cell makes, in one place, so release differences live here.

Differences are detected from the installed bridge's own signatures (the release each appeared
in is named), never scattered through the round trip:
- ``AutoBridge.save_hf_adapter``: first in 0.4.0; ``show_progress`` in every release seen.
- ``megatron.bridge.peft.utils.load_peft_adapter_checkpoint``: first in 0.5.
- ``megatron.bridge.peft.utils.create_peft_hook`` (applies PEFT and records the params to save):
  used where present, otherwise the same two calls it makes.
- ``save_hf_adapter``'s renaming and config, made in memory (``adapter_in_memory``): from 0.5
  ``convert_adapter_weights_to_peft_state`` and an inferred ``rank_pattern``; 0.4.x prefixes the names and
  casts to fp32 itself, and ``build_adapter_config_dict`` takes no ``target_parameters`` or ``rank_pattern``.
- ``LoRALinear.weight`` (the effective merged weight): absent in 0.4.x/0.5.x, where the same merge
  is ``megatron.bridge.peft.lora.LoRAMerge().merge(base, out, in, alpha, dim)`` (``peft.lora_merge`` from 0.6,
  also for TE grouped experts, whose merge the harness makes per expert: 0.5.1 has no ``lora_merge``): 0.4.x takes the
  TP group from megatron-core's parallel state, 0.5.x requires keyword-only ``tp_size``/``tp_group``
  (the adapter's own ``tp_group``), 0.6 takes an optional ``tp_group``.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

__all__ = [
    "MergeFailed",
    "adapter_filter",
    "adapter_in_memory",
    "export_base_weights",
    "has_load_peft_adapter_checkpoint",
    "load_peft_adapter_checkpoint",
    "merge_in_place",
    "model_sections",
    "peft_hook",
    "save_hf_adapter",
    "save_hf_merged",
]


def peft_hook(peft: Any, training: bool = True) -> Any:
    """A provider pre-wrap hook that applies PEFT and marks adapter params for saving."""
    from megatron.bridge.peft import utils

    if hasattr(utils, "create_peft_hook"):
        return utils.create_peft_hook(peft, training=training)

    def hook(model: list) -> list:
        model = peft(model, training=training)
        peft.set_params_to_save(model)
        return model

    return hook


def model_sections(model: list) -> dict[str, Any]:
    """Sharded state dict sections as the bridge writes them: ``model`` or ``model0``, ``model1``..."""
    if len(model) == 1:
        return {"model": model[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model)}


def adapter_filter(sections: dict[str, Any], peft: Any) -> dict[str, Any]:
    """The bridge's PEFT filter: keep only adapter tensors in the model sections."""
    from megatron.bridge.training.checkpointing import apply_peft_adapter_filter_to_state_dict

    return apply_peft_adapter_filter_to_state_dict(sections, peft)


def save_hf_adapter(bridge: Any, model: list, path: Path, peft: Any, base: Path) -> None:
    kwargs: dict[str, Any] = {"peft_config": peft, "base_model_name_or_path": str(base)}
    if "show_progress" in inspect.signature(bridge.save_hf_adapter).parameters:
        kwargs["show_progress"] = False
    bridge.save_hf_adapter(model, str(path), **kwargs)


def adapter_in_memory(
    peft: Any, stream: list[tuple[str, Any]], base: str
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(state, config, the functions used): ``export_adapter_weights``' stream renamed and configured by the
    bridge's own functions as the installed ``save_hf_adapter`` calls them, with no file written."""
    from megatron.bridge.models.conversion import peft_bridge

    where = "megatron/bridge/models/conversion/peft_bridge.py: "
    if not hasattr(peft_bridge, "convert_adapter_weights_to_peft_state"):  # 0.4.x: auto_bridge.py's own loop
        state = {f"base_model.model.{name}": tensor.clone().float() for name, tensor in stream}
        targets = peft_bridge.infer_target_modules_from_adapter_weights(state.keys())
        config = peft_bridge.build_adapter_config_dict(peft, target_modules=targets, base_model_name_or_path=base)
        return state, config, where + "infer_target_modules_from_adapter_weights, build_adapter_config_dict"
    from megatron.bridge.models.conversion.model_bridge import HFWeightTuple

    raw = [HFWeightTuple(name, tensor) for name, tensor in stream]
    state, keys, target_parameters = peft_bridge.convert_adapter_weights_to_peft_state(raw)
    config = peft_bridge.build_adapter_config_dict(
        peft,
        target_modules=peft_bridge.infer_target_modules_from_adapter_weights(keys),
        target_parameters=target_parameters,
        base_model_name_or_path=base,
        rank_pattern=peft_bridge.infer_rank_pattern_from_adapter_weights(raw, default_rank=getattr(peft, "dim", 32)),
    )
    used = "convert_adapter_weights_to_peft_state, infer_rank_pattern_from_adapter_weights, "
    return state, config, where + used + "infer_target_modules_from_adapter_weights, build_adapter_config_dict"


def export_base_weights(bridge: Any, model: list, keep: Any, cpu: bool = True) -> Any:
    """Collective: (HF name, tensor) of the base weights whose Megatron name ``keep`` accepts, by the
    bridge's base conversion alone (no adapter merge: ``merge_adapter_weights``, 0.5+), on the CPU if ``cpu``.

    The same tasks are kept on every rank (the names are global), so the TP/PP gathers pair up.
    Names are the base checkpoint's: without the merge, 0.6 names a wrapped weight peft's way,
    ``<module>.base_layer.weight`` (``megatron/bridge/models/conversion/model_bridge.py:1411-1417``).
    """
    tasks = [t for t in bridge.get_conversion_tasks(model) if t is not None and keep(t.global_param_name)]
    params = inspect.signature(bridge.export_hf_weights).parameters
    kwargs: dict[str, Any] = {"cpu": cpu, "conversion_tasks": tasks}
    if "show_progress" in params:
        kwargs["show_progress"] = False
    if "merge_adapter_weights" in params:
        kwargs["merge_adapter_weights"] = False
    for name, tensor in bridge.export_hf_weights(model, **kwargs):
        yield re.sub(r"\.base_layer(?=\.[^.]+$|$)", "", name), tensor


def has_load_peft_adapter_checkpoint() -> bool:
    from megatron.bridge.peft import utils

    return hasattr(utils, "load_peft_adapter_checkpoint")


def load_peft_adapter_checkpoint(model: list, path: Path, peft: Any) -> None:
    from megatron.bridge.peft.utils import load_peft_adapter_checkpoint as load

    load(model, str(path), peft, strict=False)


def save_hf_merged(bridge: Any, model: list, path: Path, hf_dir: Path) -> str | None:
    """A full HF checkpoint with adapter weights merged; None when written, else why not (older bridges).

    ``save_hf_weights(merge_adapter_weights=True)`` writes the weights; the config is the base
    model's (``save_hf_pretrained`` would also save a tokenizer, which tiny models lack).
    """
    import shutil

    import torch.distributed as dist

    params = inspect.signature(bridge.save_hf_weights).parameters
    if "merge_adapter_weights" not in params:
        return f"megatron-bridge {_version()}'s AutoBridge.save_hf_weights has no merge_adapter_weights"
    kwargs: dict[str, Any] = {"merge_adapter_weights": True}
    if "show_progress" in params:
        kwargs["show_progress"] = False
    bridge.save_hf_weights(model, str(path), **kwargs)
    if dist.get_rank() == 0:
        shutil.copy(hf_dir / "config.json", path / "config.json")
    return None


def merge_in_place(model: list, peft: Any) -> str | None:
    """Merge every LoRA adapter into its base weights with the bridge's own merge, then disable the
    adapters, so the model computes with merged weights. Collective over TP groups.

    Dense layers (local or TE linears) merge through ``LoRALinear.weight`` (``LoRAMerge`` with the
    adapter's TP group). Grouped-GEMM experts (TE ``weight0..weightN-1``) merge expert by expert with
    ``LoRAMerge``: one shared adapter into every expert (the bridge's default), or slice ``i`` of a
    per-expert (``GroupedExpertLinearAdapter``) or shared-outer adapter into ``weight{i}``. Returns
    None when merged, else why nothing changed: an adapter kind the bridge offers no merged weight
    for (canonical LoRA's split wrappers, DoRA), or grouped experts under expert tensor parallelism.
    Raises ``MergeFailed`` naming the module whose merge raised; no weight has changed then.
    """
    import torch
    from megatron.bridge.peft.lora_layers import LoRALinear

    # names as in the checkpoint, without the bf16/DDP wrappers' "module." prefixes
    named = {m: re.sub(r"^(module\.)+", "", name) for chunk in model for name, m in chunk.named_modules()}
    wrappers = [m for m in named if hasattr(m, "adapter") and hasattr(m, "to_wrap")]
    if not wrappers:
        return None  # nothing to merge on this rank; no adapter on any rank fails the cell first (roundtrip._fill)
    other = sorted({type(m).__name__ for m in wrappers if not isinstance(m, LoRALinear)})
    if other:
        return f"megatron-bridge {_version()} offers no merged weight for {', '.join(other)} (only LoRALinear.weight)"
    grouped = [m for m in wrappers if not hasattr(m.to_wrap, "weight")]
    if any(_group_size(getattr(m.adapter, "expert_tp_group", None) or getattr(m.adapter, "tp_group", None)) > 1
           for m in grouped):  # fmt: skip
        return "merging grouped-expert adapters under expert tensor parallelism is not implemented here (etp > 1)"
    with torch.no_grad():
        merged = []
        for m in wrappers:
            try:
                merged += _grouped_weights(m) if m in grouped else [(m.to_wrap.weight, _effective_weight(m))]
            except Exception as exc:  # the bridge's merge raised: say for which module
                raise MergeFailed(named[m], exc) from exc
        for base, weight in merged:
            base.copy_(weight)
    peft.disable_adapter_layers(model)
    return None


class MergeFailed(Exception):
    """The bridge's merge raised for one adapter wrapper (``module``, as Megatron names it)."""

    def __init__(self, module: str, cause: BaseException) -> None:
        super().__init__(module)
        self.module, self.cause = module, cause


def _group_size(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if group is not None else 1


def _grouped_weights(m: Any) -> list[tuple[Any, Any]]:
    """(weight{i}, merged weight{i}) for each local expert of a TE grouped linear (expert TP 1)."""
    a = m.adapter
    lin, lout = a.linear_in.weight, a.linear_out.weight
    out = []
    for i in range(m.to_wrap.num_gemms):
        base = getattr(m.to_wrap, f"weight{i}")
        out_i, in_i = (lout[i] if lout.dim() == 3 else lout), (lin[i] if lin.dim() == 3 else lin)
        merged = _merge(base, out_i, in_i, a.alpha, a.dim, None)
        out.append((base, merged.to(device=base.device, dtype=base.dtype)))
    return out


def _version() -> str:
    from importlib.metadata import version

    return version("megatron-bridge")


def _effective_weight(m: Any) -> Any:
    """``LoRALinear.weight`` (0.6+), or the same merge through ``LoRAMerge`` (0.4.x/0.5.x)."""
    from megatron.bridge.peft.lora_layers import LoRALinear

    if isinstance(inspect.getattr_static(LoRALinear, "weight", None), property):
        return m.weight
    from megatron.core import parallel_state

    base = m.to_wrap.weight
    if not m._adapter_enabled:
        return base
    group = getattr(m.adapter, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
    a = m.adapter
    merged = _merge(base, a.linear_out.weight, a.linear_in.weight, a.alpha, a.dim, group)
    return merged.to(device=base.device, dtype=base.dtype)


def _merge(base: Any, linear_out: Any, linear_in: Any, alpha: Any, dim: int, group: Any) -> Any:
    """``LoRAMerge().merge`` of the installed release: in ``megatron.bridge.peft.lora_merge`` from 0.6, in
    ``megatron.bridge.peft.lora`` before; 0.4.x takes no TP group (parallel state's), 0.5.x requires
    keyword-only ``tp_size``/``tp_group``, 0.6 an optional ``tp_group`` (``None``: not sharded)."""
    from importlib.util import find_spec

    if find_spec("megatron.bridge.peft.lora_merge") is not None:
        from megatron.bridge.peft.lora_merge import LoRAMerge
    else:
        from megatron.bridge.peft.lora import LoRAMerge
    params = inspect.signature(LoRAMerge.merge).parameters
    kwargs: dict[str, Any] = {}
    if "tp_group" in params:
        kwargs["tp_group"] = group
        if "tp_size" in params:
            kwargs["tp_size"] = _group_size(group)
    return LoRAMerge().merge(base, linear_out, linear_in, alpha, dim, **kwargs)
