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
from compat.declare.adapters import get_adapter
from compat.declare.cells import Cell
from compat.rank import bridge_api
from compat.rank.backends import Backend
from compat.rank.collective import Collective
from compat.rank.memory_peft import Consumer, bound, judge_consumer
from compat.rank.model_build import Built
from compat.rank.paths import CellPaths, write_json_atomic

__all__ = ["run"]

STREAM, VERL, BRIDGE = "memory sync", "memory sync (verl)", "memory sync (bridge)"


def run(cell: Cell, built: Built, paths: CellPaths, backend: Backend, comm: Collective) -> list[Problem]:
    """Collective over the cell's ranks; the same problems on every rank. Rank 0's measures go to
    ``paths.memory_sync`` (the cell's ``metrics.memory_sync``)."""
    import torch

    # verl's call (verl/workers/engine/megatron/transformer_impl.py, get_per_tensor_param): defaults, every rank
    stream = [(name, tensor.detach().clone()) for name, tensor in built.bridge.export_adapter_weights(built.model)]
    digests = comm.gather(digest(stream))
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

    from compat.serving.frameworks import framework_config, verl_lora

    bridge_state, bridge_config, functions = bridge_api.adapter_in_memory(
        built.peft, list(stream.items()), str(paths.hf)
    )
    adapter_dir = paths.where(paths.adapter)
    try:
        file_state = load_file(str(adapter_dir / "adapter_model.safetensors"))
        file_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except Exception as exc:  # the file checks say what is wrong with the files; verl is judged against the bridge
        why = f"the file export cannot be read to compare the stream with ({type(exc).__name__}): "
        problems = [Problem(STREAM, why + "verl's config is compared with the bridge's in-memory config")]
        file_config = bridge_config
    else:
        problems = [
            Problem(BRIDGE, p) for p in compare_tensors(bridge_state, file_state, "the stream as the bridge renames it")
        ]
        problems += [
            Problem(BRIDGE, p) for p in compare_configs(bridge_config, file_config, "the bridge's config in memory")
        ]

    lora = verl_lora(get_adapter(cell.adapter))
    verl = framework_config("verl", lora)
    lacks = [f for f in ("rank_pattern", "alpha_pattern", "use_dora", "use_rslora") if f not in verl["peft_config"]]
    where = f"{verl['function']} builds no {', '.join(lacks)}" if lacks else verl["function"]
    modules = stream_modules(list(stream))
    diverged, inert = config_divergence(verl["peft_config"], file_config, modules, "verl", where)
    problems += [Problem(VERL, msg, tensors=names) for msg, names in diverged]

    paths.memory.mkdir(exist_ok=True)  # what a serving engine's process takes, as verl hands it
    save_file({k: v.contiguous() for k, v in stream.items()}, str(paths.memory / "stream.safetensors"))
    write_json_atomic(paths.memory / "verl.json", verl)

    metrics: dict[str, Any] = {
        "stream": {"tensors": len(stream), "call": "AutoBridge.export_adapter_weights(model), on every rank"},
        "verl": {"model.lora": lora, **verl, "differs_without_effect": inert},
        "bridge": {"functions": functions},
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
