"""A cell's Megatron model, built the way users build it: through the bridge, with LoRA applied.

bridge from the tiny HF checkpoint -> provider at the layout and layer spec -> LoRA through the
provider's pre-wrap hook -> model parallel state -> the distributed model with the HF weights.

What cannot be built here is :class:`Unsupported` only for a reason that is about *here*
(Transformer Engine and what only it provides, a missing package, an architecture the bridge does
not register, an option the installed bridge lacks, a ``NotImplementedError`` upstream declares);
any other exception, HF -> Megatron weight conversion included, is the cell's error.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compat.checks.compare import torch_dtype
from compat.checks.findings import Unsupported
from compat.checks.upstream import describe, upstream_frames, upstream_path
from compat.declare import specs
from compat.declare.adapters import Adapter, get_adapter
from compat.declare.cells import Cell
from compat.declare.families import Family, get_family
from compat.declare.layouts import Layout
from compat.rank import bridge_api, provider_spec

if TYPE_CHECKING:
    from compat.rank.backends.protocol import Backend

__all__ = ["Built", "build", "unwrap"]


@dataclass
class Built:
    """One rank's model chunks with the bridge and PEFT objects that made them."""

    bridge: Any
    model: list
    peft: Any
    hidden_size: int


def build(cell: Cell, hf_dir: Path, layout: Layout, backend: Backend) -> Built:
    """The model of ``cell`` at ``layout`` on this rank; model parallel state set up once."""
    from megatron.bridge import AutoBridge

    family, adapter = get_family(cell.family), get_adapter(cell.adapter)
    _refuse_unregistered(family, AutoBridge)
    _refuse_unavailable_options(adapter)
    reason = specs.unavailable(cell.spec, backend.name)
    if reason:
        raise Unsupported(reason)
    try:
        return _build(cell, family, adapter, hf_dir, layout, backend, AutoBridge)
    except ModuleNotFoundError as exc:
        # Only a top-level package that is not installed is absent here; a module missing inside an
        # installed one (megatron.bridge.models.x) is that package broken or changed: an error.
        if not exc.name or _installed(exc.name.split(".")[0]):
            raise
        raise Unsupported(f"needs the package {exc.name}: imported at {describe(exc)}") from exc
    except ImportError as exc:
        # Upstream code raising ImportError itself names an optional package it needs ("FLA is not
        # installed"); a name missing from a module ("cannot import name") is an API change: an error.
        if str(exc).startswith("cannot import name") or not upstream_frames(exc):
            raise
        raise Unsupported(f"needs a package that is not installed here: {describe(exc)}") from exc
    except NotImplementedError as exc:
        if not upstream_frames(exc):
            raise
        raise Unsupported(f"upstream does not implement this: {describe(exc)}") from exc


def _installed(top_level: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(top_level) is not None
    except (ImportError, ValueError):
        return False


def _build(
    cell: Cell, family: Family, adapter: Adapter, hf_dir: Path, layout: Layout, backend: Backend, AutoBridge: Any
) -> Built:
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core import parallel_state

    dtype = torch_dtype(cell.dtype)
    bridge = AutoBridge.from_hf_pretrained(str(hf_dir), torch_dtype=dtype)
    provider = bridge.to_megatron_provider(load_weights=True)
    provider_spec.configure(cell.spec, provider, local_layer_spec, cell.dtype)
    provider.tensor_model_parallel_size = layout.tp
    provider.pipeline_model_parallel_size = layout.pp
    provider.virtual_pipeline_model_parallel_size = layout.vpp if layout.vpp > 1 else None
    provider.expert_model_parallel_size = layout.ep
    provider.expert_tensor_parallel_size = layout.etp
    provider.sequence_parallel = bool(layout.sp)
    provider.params_dtype = dtype
    provider.pipeline_dtype = dtype
    provider.bf16 = cell.dtype == "bf16"
    provider.fp16 = False
    backend.configure(provider)
    provider.finalize()
    if family.is_moe and not getattr(provider, "moe_grouped_gemm", False):
        _refuse_grouped_only_experts(bridge)
    peft = adapter.build()
    provider.register_pre_wrap_hook(bridge_api.peft_hook(peft, training=True))
    if not parallel_state.model_parallel_is_initialized():
        provider.initialize_model_parallel(seed=0)
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=backend.name == "cpu")
    for chunk in model:
        chunk.eval()
    return Built(bridge, model, peft, provider.hidden_size)


def _refuse_unregistered(family: Family, AutoBridge: Any) -> None:
    if family.architecture in AutoBridge.list_supported_models():
        return
    where = inspect.getsourcefile(AutoBridge.list_supported_models) or "auto_bridge.py"
    line = inspect.getsourcelines(AutoBridge.list_supported_models)[1]
    raise Unsupported(
        f"megatron-bridge {version('megatron-bridge')} registers no bridge for {family.architecture} "
        f"({upstream_path(where) or where}:{line}, AutoBridge.list_supported_models)"
    )


def _refuse_unavailable_options(adapter: Adapter) -> None:
    unavailable = adapter.unavailable_options()
    if not unavailable:
        return
    cls = adapter.peft_class()
    raise Unsupported(
        f"megatron-bridge {version('megatron-bridge')}'s {cls.__name__} has no option {', '.join(unavailable)} "
        f"({upstream_path(inspect.getsourcefile(cls) or '') or cls.__module__})"
    )


def _refuse_grouped_only_experts(bridge: Any) -> None:
    """Without grouped GEMM (no TE) experts are SequentialMLP: the bridge must map ``local_experts``.

    Some bridges name routed experts only as grouped-GEMM weights (``mlp.experts.linear_fc1.weight*``);
    their weight conversion then dereferences a missing mapping. That is a TE-only component
    missing here, so it is refused by looking at the bridge's mappings, before any conversion runs.
    """
    model_bridge = bridge._model_bridge
    mappings = model_bridge.mapping_registry().get_all_mappings()
    names = [str(getattr(m, "megatron_param", "")) for m in mappings]
    if not any(".experts." in n for n in names) or any("local_experts" in n for n in names):
        return
    method = type(model_bridge).mapping_registry
    where = upstream_path(inspect.getsourcefile(method) or "") or type(model_bridge).__module__
    raise Unsupported(
        f"needs transformer_engine: {type(model_bridge).__name__} maps routed experts only as grouped-GEMM weights "
        f"(e.g. {next(n for n in names if '.experts.' in n)}; {where}:{inspect.getsourcelines(method)[1]}), and "
        "without TE the experts are SequentialMLP (local_experts.N), which no mapping names"
    )


def unwrap(chunk: Any) -> Any:
    """The GPT model under Megatron's wrappers (Float16Module, DDP)."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
