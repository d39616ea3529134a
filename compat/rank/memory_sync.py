"""The adapter as an RL rollout receives it: in memory, on every rank, with the framework's own config.

verl's default LoRA rollout sync (``lora.merge=False``) writes no adapter file: each trainer rank
streams ``AutoBridge.export_adapter_weights(model)`` and hands the (name, tensor) pairs, unrenamed, with
the config verl's ``build_peft_config_for_vllm`` builds, to its rollout engine (a ``TensorLoRARequest``
for vLLM); the places in verl's source are found in the pinned verl itself (``compat/serving/verl_sync.py``)
and recorded in the cell's ``metrics.memory_sync.verl``. This step, run right after the file export,
takes the stream the same way on every rank and judges it (``compat.checks.memory_sync``):

- every rank streamed the same adapter, bit for bit: each rank feeds its own engine;
- the bridge's own renaming and config (``convert_adapter_weights_to_peft_state``,
  ``build_adapter_config_dict``), made in memory, against the file export: names, shapes, values, fields;
- verl's config (run in verl's pinned environment, ``compat.serving.frameworks``) against the file
  export's, module by module: each module's scaling (r, alpha, patterns, rsLoRA), DoRA, layout;
- ``peft`` built from the tensors and each config, no file, its logits against Megatron's
  (``compat.rank.memory_peft``), for which Megatron's base model runs once here too (the bound's base drift).

Rank 0 keeps the stream as verl hands it (``memory/stream.safetensors``, ``memory/verl.json``) for a
serving engine's process (``compat.serving``: vLLM from tensors). Its problems are the cell's, under the
checks ``memory sync``, ``memory sync (verl)`` and ``memory sync (bridge)``.
"""

from __future__ import annotations

import json
from typing import Any

from compat.checks.memory_sync import (
    compare_configs,
    compare_tensors,
    config_divergence,
    digest,
    ranks_agree,
    stream_modules,
)
from compat.checks.problems import Problem
from compat.declare.adapters import Adapter, get_adapter
from compat.declare.cells import Cell
from compat.declare.families import get_family
from compat.rank.activations import megatron_forward
from compat.rank.backends import Backend
from compat.rank.collective import Collective
from compat.rank.memory_peft import Consumer, bound, judge_consumer
from compat.rank.model_build import Built
from compat.rank.paths import CellPaths, write_json_atomic

__all__ = ["run", "verl_lora"]

STREAM, VERL, BRIDGE = "memory sync", "memory sync (verl)", "memory sync (bridge)"
BRIDGE_FUNCTIONS = (
    "megatron/bridge/models/conversion/peft_bridge.py: convert_adapter_weights_to_peft_state, "
    "infer_rank_pattern_from_adapter_weights, infer_target_modules_from_adapter_weights, build_adapter_config_dict"
)


def verl_lora(adapter: Adapter) -> dict[str, Any]:
    """verl's ``model.lora`` for the cell's adapter (verl/trainer/config/model/hf_model.yaml): the mapping
    its Megatron engine gives ``megatron.bridge.peft.utils.create_peft`` and ``build_peft_config_for_vllm``."""
    return {
        "type": adapter.peft,
        "merge": False,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "dropout": adapter.dropout,
        "target_modules": list(adapter.targets),
        **dict(adapter.options),
    }


def run(cell: Cell, built: Built, paths: CellPaths, backend: Backend, comm: Collective) -> list[Problem]:
    """Collective over the cell's ranks; the same problems on every rank. Rank 0's measures go to
    ``paths.memory_sync`` (the cell's ``metrics.memory_sync``)."""
    import torch

    # verl's call (verl/workers/engine/megatron/transformer_impl.py, get_per_tensor_param): defaults, every rank
    stream = [(w.param_name, w.weight.detach().clone()) for w in built.bridge.export_adapter_weights(built.model)]
    digests = comm.gather(digest(stream))
    if hasattr(built.peft, "disable_adapter_layers") and hasattr(built.peft, "enable_adapter_layers"):
        built.peft.disable_adapter_layers(built.model)  # Megatron's base model: the bound's measured drift
        vocab = get_family(cell.family).dims.vocab_size
        megatron_forward(built.model, backend, built.hidden_size, vocab, paths, "base")
        built.peft.enable_adapter_layers(built.model)
    comm.barrier()
    problems: list[Problem] = []
    if comm.rank == 0:
        problems = [Problem(STREAM, p) for p in ranks_agree(digests)]
        with torch.no_grad():
            problems += _judge(cell, built, paths, dict(stream), backend.device)
    return comm.collect(problems, STREAM)


def _judge(cell: Cell, built: Built, paths: CellPaths, stream: dict[str, Any], device: Any) -> list[Problem]:
    """Rank 0: the stream against the file export, through the bridge's and verl's code, then as peft."""
    from safetensors.torch import load_file, save_file

    from compat.serving.frameworks import framework_config

    adapter_dir = paths.where(paths.adapter)
    file_state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    file_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    bridge_state, bridge_config = _bridge_in_memory(built, list(stream.items()), str(paths.hf))
    problems = [
        Problem(BRIDGE, p) for p in compare_tensors(bridge_state, file_state, "the stream as the bridge renames it")
    ]
    problems += [
        Problem(BRIDGE, p) for p in compare_configs(bridge_config, file_config, "the bridge's config in memory")
    ]

    lora = verl_lora(get_adapter(cell.adapter))
    verl = framework_config("verl", lora)
    where = f"{verl['function']} carries no rank_pattern, alpha_pattern, use_dora, use_rslora or target_parameters"
    modules = stream_modules(list(stream))
    diverged, inert = config_divergence(verl["peft_config"], file_config, modules, "verl", where)
    problems += [Problem(VERL, msg, tensors=names) for msg, names in diverged]

    paths.memory.mkdir(exist_ok=True)  # what a serving engine's process takes, as verl hands it
    save_file({k: v.contiguous() for k, v in stream.items()}, str(paths.memory / "stream.safetensors"))
    write_json_atomic(paths.memory / "verl.json", verl)

    metrics: dict[str, Any] = {
        "stream": {"tensors": len(stream), "call": "AutoBridge.export_adapter_weights(model), on every rank"},
        "verl": {"model.lora": lora, **verl, "differs_without_effect": inert},
        "bridge": {"functions": BRIDGE_FUNCTIONS},
    }
    tol = bound(cell, paths, device, metrics)
    metrics["adapter_allowed"] = str(tol)
    consumers = (
        (VERL, Consumer("verl", stream, verl["peft_config"], wrapped=False)),
        (BRIDGE, Consumer("the bridge", bridge_state, bridge_config, wrapped=True)),
    )
    for check, consumer in consumers:
        found, measured = judge_consumer(cell, paths, consumer, tol, device)
        problems += [Problem(check, p) for p in found]
        metrics["verl" if check == VERL else "bridge"].update(measured)
    write_json_atomic(paths.memory_sync, metrics)
    return problems


def _bridge_in_memory(built: Built, stream: list[tuple[str, Any]], base: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stream renamed and configured by the bridge's own functions, as ``save_hf_adapter`` calls them
    (megatron/bridge/models/conversion/auto_bridge.py), with no file written."""
    from megatron.bridge.models.conversion.model_bridge import HFWeightTuple
    from megatron.bridge.models.conversion.peft_bridge import (
        build_adapter_config_dict,
        convert_adapter_weights_to_peft_state,
        infer_rank_pattern_from_adapter_weights,
        infer_target_modules_from_adapter_weights,
    )

    raw = [HFWeightTuple(name, tensor) for name, tensor in stream]
    state, keys, target_parameters = convert_adapter_weights_to_peft_state(raw)
    rank_pattern = infer_rank_pattern_from_adapter_weights(raw, default_rank=getattr(built.peft, "dim", 32))
    config = build_adapter_config_dict(
        built.peft,
        target_modules=infer_target_modules_from_adapter_weights(keys),
        target_parameters=target_parameters,
        base_model_name_or_path=base,
        rank_pattern=rank_pattern,
    )
    return state, config
