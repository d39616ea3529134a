"""The adapter round trip, as each rank of a cell runs it.

bridge -> provider at the layout -> LoRA through the pre-wrap hook -> Megatron model -> seeded
non-zero adapter values -> adapter-only dist checkpoint through the PEFT filter -> a fresh model
with other values -> load through the filter -> ``save_hf_adapter`` -> rank 0: the HF base model
and ``peft.PeftModel`` from the written files, logits compared with Megatron's.

Every check collects problems per rank and calls :func:`agree`, so a failing check ends every
rank together with one reason instead of leaving ranks blocked in the next collective.
"""

from __future__ import annotations

import functools
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from compat import bridge_api
from compat.adapters import get_adapter
from compat.backends import Backend
from compat.cells import Cell
from compat.compare import ADAPTER_EFFECT_MIN, TOLERANCES, compare, token_agreement
from compat.families import build_tiny_model, get_family
from compat.layouts import Layout
from compat.peft_files import check_adapter_dir, check_loaded_by_peft

__all__ = ["PHASES", "CheckFailed", "Paths", "Unsupported", "run_phase"]

SEQUENCES, TOKENS = 2, 16
ADAPTER_SCALE = 0.05
SAVE_SEED, OTHER_SEED = 1, 2
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PHASES = ("roundtrip", "save", "load")


class CheckFailed(Exception):
    """A check failed on some rank: the cell's status is ``fail`` with this reason."""


class Unsupported(Exception):
    """The cell cannot be built here; the reason names the upstream file and line or the package."""


UPSTREAM_PACKAGES = ("megatron", "transformers", "peft", "torch", "safetensors")


@functools.cache
def _upstream_roots() -> tuple[Path, ...]:
    """Directories holding the upstream packages, wherever they are installed (a venv, --target dir)."""
    import importlib.util

    roots = set()
    for name in UPSTREAM_PACKAGES:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            roots.add(Path(location).resolve().parent)
    return tuple(sorted(roots))


def _upstream_path(filename: str) -> str | None:
    """``megatron/core/...py`` for a file of an upstream package, None for any other file."""
    path = Path(filename).resolve()
    for root in _upstream_roots():
        if path.is_relative_to(root) and path.relative_to(root).parts[0] in UPSTREAM_PACKAGES:
            return path.relative_to(root).as_posix()
    return None


def _is_build_limit(exc: BaseException) -> bool:
    """A model that fails to *build* without TE, in upstream model code, not in the PEFT code.

    Failures that pass through megatron/bridge/peft (applying the adapter) stay errors: they are
    what the harness exists to report.
    """
    import traceback

    from compat.workarounds.transformer_engine import needed as te_missing

    files = [_upstream_path(f.filename) for f in traceback.extract_tb(exc.__traceback__)]
    upstream = [f for f in files if f]
    return te_missing() and bool(upstream) and not any(f.startswith("megatron/bridge/peft/") for f in upstream)


def _upstream_frame(exc: BaseException) -> str:
    """``file:line`` of the innermost frame in upstream code, relative to where it is installed."""
    import traceback

    frames = [(path, f.lineno) for f in traceback.extract_tb(exc.__traceback__) if (path := _upstream_path(f.filename))]
    if not frames:
        return "unknown location"
    path, line = frames[-1]
    return f"{path}:{line}"


@dataclass(frozen=True)
class Paths:
    """Where a cell's launches write: one directory per cell, never shared between cells."""

    root: Path

    @property
    def hf(self) -> Path:
        return self.root / "hf"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def reference_adapter(self) -> Path:
        """The export at the save layout, which a resharded load must reproduce bit for bit."""
        return self.root / "adapter-at-save-layout"

    @property
    def merged(self) -> Path:
        """The full HF checkpoint the bridge exports with adapter weights merged."""
        return self.root / "merged-hf"

    def activations(self, pp_rank: int, tag: str = "adapter") -> Path:
        return self.root / f"megatron-{tag}-pp{pp_rank}.pt"


@dataclass
class Outcome:
    """What rank 0 reports besides pass/fail."""

    metrics: dict[str, Any] = field(default_factory=dict)


_HARNESS_GROUP: Any = None


def _harness_group() -> Any:
    """The harness's own collectives run on a separate gloo communicator.

    A rank that an upstream exception took out of an upstream collective early then waits here,
    where no upstream collective of its peers can be matched with its own: the cell shows as a
    hang (stacks dumped) instead of ranks exchanging each other's unrelated buffers. Created by
    :func:`run_phase` on every rank before anything else, as ``new_group`` requires.
    """
    return _HARNESS_GROUP


def agree(problems: list[str]) -> None:
    """Exchange problems between all ranks; raise the same :class:`CheckFailed` on every rank."""
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems, group=_harness_group())
    merged: list[str] = []
    for rank, rank_problems in enumerate(gathered):
        for problem in rank_problems or []:
            if problem not in merged and all(problem not in m for m in merged):
                merged.append(f"rank {rank}: {problem}")
    if merged:
        shown = merged[:8] + ([f"... and {len(merged) - 8} more"] if len(merged) > 8 else [])
        raise CheckFailed("; ".join(shown))


def _barrier() -> None:
    dist.barrier(group=_harness_group())


def _is_adapter(name: str) -> bool:
    """The bridge's own test for adapter state (``PEFT.adapter_key_filter``)."""
    return ".adapter." in name or name.endswith(".adapters")


def _is_expert(name: str) -> bool:
    return ".experts." in name


class RankRun:
    """One rank's view of one launch of a cell."""

    def __init__(self, cell: Cell, paths: Paths, backend: Backend) -> None:
        from megatron.core import parallel_state as ps

        self.cell, self.paths, self.backend, self.ps = cell, paths, backend, ps
        self.family = get_family(cell.family)
        self.adapter = get_adapter(cell.adapter)
        self.dtype = TORCH_DTYPES[cell.dtype]
        self.rank = dist.get_rank()

    # -- building -------------------------------------------------------------------------
    def ensure_hf_model(self) -> None:
        if self.rank == 0 and not (self.paths.hf / "config.json").exists():
            build_tiny_model(self.family, self.paths.hf)
        _barrier()

    def build(self, layout: Layout) -> tuple[Any, list, Any]:
        """(bridge, model chunks, PEFT object) at ``layout``; model parallel state set up once."""
        import inspect
        from importlib.metadata import version

        from megatron.bridge import AutoBridge
        from megatron.bridge.models.gpt_provider import local_layer_spec

        if self.family.architecture not in AutoBridge.list_supported_models():
            where = inspect.getsourcefile(AutoBridge.list_supported_models) or "auto_bridge.py"
            line = inspect.getsourcelines(AutoBridge.list_supported_models)[1]
            raise Unsupported(
                f"megatron-bridge {version('megatron-bridge')} registers no bridge for "
                f"{self.family.architecture} ({_upstream_path(where) or where}:{line}, "
                "AutoBridge.list_supported_models)"
            )
        unavailable = self.adapter.unavailable_options()
        if unavailable:
            cls = self.adapter.peft_class()
            raise Unsupported(
                f"megatron-bridge {version('megatron-bridge')}'s {cls.__name__} has no option {', '.join(unavailable)} "
                f"({_upstream_path(inspect.getsourcefile(cls) or '') or cls.__module__})"
            )
        try:
            return self._build(AutoBridge, local_layer_spec, layout)
        except ImportError as exc:
            raise Unsupported(f"needs {exc.name or exc}: imported at {_upstream_frame(exc)}") from exc
        except Exception as exc:
            if not _is_build_limit(exc):
                raise
            raise Unsupported(
                f"cannot be built here: {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''} at {_upstream_frame(exc)} "
                "(model code, local layer spec, no Transformer Engine)"
            ) from exc

    def _build(self, AutoBridge: Any, local_layer_spec: Any, layout: Layout) -> tuple[Any, list, Any]:
        bridge = AutoBridge.from_hf_pretrained(str(self.paths.hf), torch_dtype=self.dtype)
        provider = bridge.to_megatron_provider(load_weights=True)
        provider.transformer_layer_spec = _layer_spec_without_te(
            provider.transformer_layer_spec, local_layer_spec, provider
        )
        provider.tensor_model_parallel_size = layout.tp
        provider.pipeline_model_parallel_size = layout.pp
        provider.virtual_pipeline_model_parallel_size = layout.vpp if layout.vpp > 1 else None
        provider.expert_model_parallel_size = layout.ep
        provider.expert_tensor_parallel_size = layout.etp
        provider.sequence_parallel = False
        provider.params_dtype = self.dtype
        provider.pipeline_dtype = self.dtype
        provider.bf16 = self.dtype == torch.bfloat16
        provider.fp16 = False
        self.backend.configure(provider)
        provider.finalize()
        peft = self.adapter.build()
        provider.register_pre_wrap_hook(bridge_api.peft_hook(peft, training=True))
        if not self.ps.model_parallel_is_initialized():
            provider.initialize_model_parallel(seed=0)
        model = provider.provide_distributed_model(
            wrap_with_ddp=False, use_cpu_initialization=self.backend.name == "cpu"
        )
        for chunk in model:
            chunk.eval()
        self.hidden_size = provider.hidden_size
        return bridge, model, peft

    # -- adapter values --------------------------------------------------------------------
    def _coords(self, name: str, p: torch.Tensor) -> str:
        """Which shard a tensor is: equal on its replicas, distinct across the ranks that shard it.

        Megatron marks tensor-parallel shards (``tensor_model_parallel``); anything else, such as
        DoRA's magnitude of a row-parallel layer, is replicated over TP and must agree there.
        """
        ps = self.ps
        pp = ps.get_pipeline_model_parallel_rank()
        sharded = getattr(p, "tensor_model_parallel", False)
        if _is_expert(name):
            etp = ps.get_expert_tensor_parallel_rank() if sharded else 0
            return f"pp{pp}-ep{ps.get_expert_model_parallel_rank()}-etp{etp}"
        return f"pp{pp}-tp{ps.get_tensor_model_parallel_rank() if sharded else 0}"

    def adapter_params(self, model: list) -> dict[str, torch.nn.Parameter]:
        return {
            f"{v}/{name}": p
            for v, chunk in enumerate(model)
            for name, p in chunk.named_parameters()
            if _is_adapter(name)
        }

    def base_params(self, model: list) -> dict[str, torch.Tensor]:
        return {
            f"{v}/{name}": p
            for v, chunk in enumerate(model)
            for name, p in chunk.named_parameters()
            if not _is_adapter(name)
        }

    def fill_adapters(self, model: list, seed: int) -> dict[str, torch.Tensor]:
        """Seeded random values, distinct per tensor, row, expert and rank; returns a copy."""
        values = {}
        with torch.no_grad():
            for key, p in self.adapter_params(model).items():
                g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{self._coords(key, p)}/{key}".encode()))
                p.copy_((torch.randn(p.shape, generator=g) * ADAPTER_SCALE).to(p.dtype))
                values[key] = p.detach().cpu().clone()
        if not values:
            raise CheckFailed(f"the bridge applied no adapter to any of {list(self.adapter.targets)}")
        return values

    # -- checkpoint ------------------------------------------------------------------------
    def save_checkpoint(self, model: list, peft: Any) -> None:
        from megatron.core import dist_checkpointing

        if self.rank == 0:
            self.paths.checkpoint.mkdir(parents=True, exist_ok=True)
        _barrier()
        sharded = bridge_api.adapter_filter(bridge_api.model_sections(model), peft)
        dist_checkpointing.save(sharded, str(self.paths.checkpoint))
        _barrier()
        self.check_checkpoint_contents(sharded)

    def check_checkpoint_contents(self, sharded: dict[str, Any]) -> None:
        """The checkpoint holds every adapter tensor of every rank, and nothing of the base model."""
        from megatron.core import dist_checkpointing

        mine = sorted(
            {t.key for section in sharded.values() if isinstance(section, dict) for t in _sharded_tensors(section)}
        )
        every: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine, group=_harness_group())
        problems = []
        if self.rank == 0:
            wanted = {k for keys in every for k in keys or []}
            stored = set(dist_checkpointing.load_tensors_metadata(str(self.paths.checkpoint)))
            base = sorted(k for k in stored if not _is_adapter(k))
            if base:
                problems.append(f"checkpoint holds {len(base)} base-model tensors, e.g. {base[:3]}")
            missing = sorted(wanted - stored)
            if missing:
                problems.append(f"checkpoint lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
            if not wanted:
                problems.append("the PEFT filter kept no adapter tensor to save")
        agree(problems)

    def load_checkpoint(self, model: list, peft: Any) -> None:
        """Load the way users do: the bridge's filter, ``dist_checkpointing.load``, non-strict."""
        from megatron.core import dist_checkpointing
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        sections = bridge_api.adapter_filter(bridge_api.model_sections(model), peft)
        loaded, unloadable = None, []
        try:
            loaded = dist_checkpointing.load(sections, str(self.paths.checkpoint))
        except (Exception, CheckpointException) as exc:  # a damaged checkpoint fails every rank's check
            unloadable.append(_unloadable(self.paths.checkpoint, exc))
        agree(unloadable)
        assert loaded is not None
        problems = []
        for i, chunk in enumerate(model):
            key = "model" if len(model) == 1 else f"model{i}"
            result = _unwrap(chunk).load_state_dict(loaded[key], strict=False)  # Float16Module returns None
            unexpected = list(result.unexpected_keys)
            missing_adapters = [k for k in result.missing_keys if _is_adapter(k)]
            if unexpected:
                problems.append(f"chunk {i}: checkpoint keys match no parameter: {unexpected[:3]}")
            if missing_adapters:
                problems.append(f"chunk {i}: adapter tensors not restored: {missing_adapters[:3]}")
        agree(problems)

    # -- forward and export ----------------------------------------------------------------
    def input_ids(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, self.family.dims.vocab_size, (SEQUENCES, TOKENS), generator=g).to(self.backend.device)

    def forward(self, model: list, tag: str = "adapter") -> None:
        """Megatron logits (gathered over TP, vocab padding cut) and per-layer activations to disk."""
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        ps = self.ps
        writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        activations: dict[str, torch.Tensor] = {}
        hooks = _capture_megatron_activations(model, activations)
        with torch.no_grad():
            out = self.backend.forward(model, self.input_ids(), self.hidden_size)
        for h in hooks:
            h.remove()
        if out is not None:
            logits = gather_from_tensor_model_parallel_region(out)[..., : self.family.dims.vocab_size]
            activations["logits"] = logits
        if writer:
            torch.save(
                {k: v.float().cpu() for k, v in activations.items()},
                self.paths.activations(ps.get_pipeline_model_parallel_rank(), tag),
            )
        _barrier()

    def export(self, bridge: Any, model: list, peft: Any, path: Path) -> None:
        bridge_api.save_hf_adapter(bridge, model, path, peft, self.paths.hf)
        _barrier()

    def merged(self, bridge: Any, model: list, peft: Any) -> bool:
        """Export a merged full HF checkpoint, then merge in Megatron itself and run it again.

        Returns whether the Megatron-side merge ran (the bridge offers it for plain LoRA wrappers).
        The merged export raising is this cell's finding: a failed check, with what rank 0 finds
        wrong in the adapter export itself (peers stuck in the export's collectives are then
        stopped by the launcher, which names the first rank to stop).
        """
        try:
            bridge_api.save_hf_merged(bridge, model, self.paths.merged, self.paths.hf)
        except Exception as exc:
            traceback.print_exc()  # the full stack stays in this rank's log
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            problems = [
                f"the bridge's merged HF export (save_hf_weights, merge_adapter_weights=True) raised "
                f"{type(exc).__name__}: {first} at {_upstream_frame(exc)}"
            ]
            if self.rank == 0:
                problems = self.check_adapter_files(None) + problems
            raise CheckFailed("; ".join(problems)) from exc
        _barrier()
        if not bridge_api.merge_in_place(model, peft):
            return False
        self.forward(model, tag="merged")
        return True

    # -- rank 0: the HF side ---------------------------------------------------------------
    def check_adapter_files(self, reference: Path | None) -> list[str]:
        """What is wrong in the exported files themselves (and against the export at the save layout)."""
        from safetensors.torch import load_file

        problems = check_adapter_dir(self.paths.adapter, self.adapter, self.paths.hf, self.family.hf_modules)
        if reference is not None:
            problems += _compare_exports(
                load_file(self.paths.adapter / "adapter_model.safetensors"),
                load_file(reference / "adapter_model.safetensors"),
            )
        return problems

    def compare_with_peft(self, reference: Path | None, megatron_merged: bool) -> dict[str, Any]:
        """Check the exported files, load them with ``peft``, compare logits with Megatron's."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        problems = self.check_adapter_files(reference)
        if problems:
            raise CheckFailed("; ".join(problems))
        hf = AutoModelForCausalLM.from_pretrained(str(self.paths.hf), dtype=self.dtype).eval()
        ids = self.input_ids().cpu()
        with torch.no_grad():
            base_logits = hf(ids).logits
        try:
            peft_model = PeftModel.from_pretrained(hf, str(self.paths.adapter)).eval()
        except Exception as exc:  # peft refusing the files is this cell's finding, not a crash
            first = str(exc).strip().splitlines()
            detail = "; ".join(line.strip() for line in first[:3])
            raise CheckFailed(
                f"peft.PeftModel.from_pretrained refused the export: {type(exc).__name__}: {detail}"
            ) from exc
        problems += check_loaded_by_peft(peft_model, self.paths.adapter)
        hf_acts: dict[str, torch.Tensor] = {}
        hooks = _capture_hf_activations(peft_model, hf_acts)
        with torch.no_grad():
            peft_logits = peft_model(ids).logits
        for h in hooks:
            h.remove()
        meg = _load_megatron_activations(self.paths.root, "adapter")
        tol = TOLERANCES[self.cell.dtype]
        cmp = compare(meg["logits"], peft_logits, tol)
        effect = float((peft_logits.double() - base_logits.double()).abs().max())
        metrics: dict[str, Any] = {
            "max_abs_diff": cmp.max_abs_diff,
            "adapter_effect": effect,
            "max_rel_diff": cmp.max_rel_diff,
        }
        if self.cell.dtype != "fp32":
            metrics["top1_agreement"] = token_agreement(meg["logits"], peft_logits)
        if not cmp.ok:
            where = _first_divergence(meg, hf_acts, tol)
            problems.append(
                cmp.message("Megatron logits differ from peft.PeftModel logits", ("sequence", "position", "token"))
                + (f"; first divergence: {where}" if where else "")
            )
        if effect <= ADAPTER_EFFECT_MIN:
            problems.append(
                f"the adapter does not change the logits: max |peft - base| = {effect:.3e} "
                f"(must exceed {ADAPTER_EFFECT_MIN:g})"
            )
        merged = self._merged_logits(peft_model, ids, megatron_merged)
        metrics["merged_max_abs_diff"] = {}
        for what, logits in merged.items():
            c = compare(logits, peft_logits, tol)
            metrics["merged_max_abs_diff"][what] = c.max_abs_diff
            if not c.ok:
                problems.append(
                    c.message(f"{what} logits differ from peft.PeftModel logits", ("sequence", "position", "token"))
                )
        if problems:
            raise CheckFailed("; ".join(problems), metrics)
        return metrics

    def _merged_logits(self, peft_model: Any, ids: torch.Tensor, megatron_merged: bool) -> dict[str, torch.Tensor]:
        """Logits of every merged form on offer; each must agree with the unmerged adapter."""
        from transformers import AutoModelForCausalLM

        out = {}
        with torch.no_grad():
            if (self.paths.merged / "config.json").exists():
                full = AutoModelForCausalLM.from_pretrained(str(self.paths.merged), dtype=self.dtype).eval()
                out["bridge's merged HF export (save_hf_weights)"] = full(ids).logits
            if megatron_merged:
                out["Megatron with adapters merged by the bridge"] = _load_megatron_activations(
                    self.paths.root, "merged"
                )["logits"]
            out["peft merge_and_unload"] = peft_model.merge_and_unload()(ids).logits
        return out


def _layer_spec_without_te(spec: Any, local_layer_spec: Any, provider: Any) -> Any:
    """The layer spec to build with, Transformer Engine left out.

    The GPT default (TE layers) becomes the bridge's ``local_layer_spec``; a bridge's own block spec
    built by ``partial(fn, use_transformer_engine=HAVE_TE)`` (MLA, shared experts, dense first
    layers) keeps its structure with TE off; a spec function that edits ``default_layer_spec``
    (OLMoE) edits the local spec instead; any other family-specific spec is kept as the bridge
    wrote it, and is :class:`Unsupported` when it cannot be built without TE or names a TE class.
    """
    import inspect

    from megatron.bridge.models import gpt_provider

    if spec in (gpt_provider.default_layer_spec, gpt_provider.transformer_engine_layer_spec):
        return local_layer_spec
    if isinstance(spec, functools.partial) and "use_transformer_engine" in spec.keywords:
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "use_transformer_engine": False})
    fn = spec.func if isinstance(spec, functools.partial) else spec
    name = getattr(fn, "__name__", repr(fn))
    where = inspect.getsourcefile(fn) if inspect.isfunction(fn) else None
    place = f"{_upstream_path(where) or where}:{inspect.getsourcelines(fn)[1]}" if where else repr(spec)
    if inspect.isfunction(fn) and fn.__globals__.get("default_layer_spec") is gpt_provider.default_layer_spec:
        # A spec that edits the GPT default (OLMoE: its own attention class on the TE layer):
        # the same edit on the local spec.
        fn.__globals__["default_layer_spec"] = local_layer_spec
        try:
            return spec(provider)
        finally:
            fn.__globals__["default_layer_spec"] = gpt_provider.default_layer_spec
    try:
        built = spec(provider) if callable(spec) else spec
    except (TypeError, NameError, AttributeError, AssertionError) as exc:
        # Its TE base spec cannot be built without TE (megatron-core's TE spec provider is None).
        raise Unsupported(
            f"needs transformer_engine: the bridge's layer spec {name} ({place}) builds on the TE spec and "
            f"fails without it: {type(exc).__name__}: {exc} at {_upstream_frame(exc)}"
        ) from exc
    te = sorted(_te_classes(built))
    if te:
        raise Unsupported(f"needs transformer_engine: the bridge's layer spec {name} ({place}) uses {', '.join(te)}")
    return spec


def _te_classes(spec: Any, seen: set[int] | None = None) -> set[str]:
    """Names of Transformer Engine classes anywhere in a (block or layer) ModuleSpec tree."""
    import dataclasses

    seen = set() if seen is None else seen
    if id(spec) in seen:
        return set()
    seen.add(id(spec))
    out: set[str] = set()
    if isinstance(spec, type):
        mod = getattr(spec, "__module__", "") or ""
        if "transformer_engine" in mod or "te_layers" in mod:
            out.add(spec.__name__)
        return out
    if isinstance(spec, (list, tuple)):
        for item in spec:
            out |= _te_classes(item, seen)
        return out
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for f in dataclasses.fields(spec):
            out |= _te_classes(getattr(spec, f.name), seen)
        return out
    for attr in ("module", "submodules", "layer_specs"):
        if hasattr(spec, attr):
            out |= _te_classes(getattr(spec, attr), seen)
    return out


def _sharded_tensors(section: dict[str, Any]) -> list[Any]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = []
    for v in nested_values(section):
        if isinstance(v, ShardedTensor):
            out.append(v)
        elif isinstance(v, ShardedTensorFactory):
            out.append(v)
    return out


def _unloadable(checkpoint: Path, exc: BaseException) -> str:
    """Why ``dist_checkpointing.load`` raised, naming the checkpoint file at fault where it can."""
    files = _damaged_checkpoint_files(checkpoint)
    where = "; ".join(files) if files else f"no file of {checkpoint} is short, missing or unreadable"
    return f"cannot load the adapter checkpoint {checkpoint}: {where} (load raised {_cause(exc)})"


def _cause(exc: BaseException) -> str:
    """The first line of the error; for torch's CheckpointException, of the first rank's error."""
    rank = ""
    failures = getattr(exc, "failures", None)  # CheckpointException: {rank: (exception, stack)}
    if isinstance(failures, dict) and failures:
        r, failure = sorted(failures.items(), key=lambda kv: kv[0])[0]
        exc, rank = (failure[0] if isinstance(failure, tuple) else failure), f" on checkpoint rank {r}"
    return f"{type(exc).__name__}: {_first_sentence(exc)}{rank}"


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].split(". ")[0][:160] if text else ""


def _damaged_checkpoint_files(checkpoint: Path) -> list[str]:
    """Shard files that are missing, shorter than the metadata says, or hold a tensor that won't load.

    A tensor item is a ``torch.save`` blob at (offset, length) of its file: each is loaded on its
    own, so a corrupted one is named with its file, byte range and tensor.
    """
    try:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = FileSystemReader(str(checkpoint)).read_metadata()
    except Exception as exc:
        return [f"its metadata {checkpoint / '.metadata'} cannot be read ({type(exc).__name__}: {exc})"]
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(needed.items()):
        path, shown = checkpoint / name, f"{checkpoint.name}/{name}"
        if not path.exists():
            problems.append(f"{shown} is missing")
        elif path.stat().st_size < end:
            problems.append(f"{shown} is {path.stat().st_size} bytes, its metadata places data up to byte {end}")
    if problems:
        return problems
    import io

    unreadable = []
    for index, info in sorted(metadata.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        is_tensor = isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata)
        if info.transform_descriptors or not is_tensor:
            continue
        with open(checkpoint / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        try:
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as exc:
            unreadable.append(
                f"{checkpoint.name}/{info.relative_path} bytes {info.offset}-{info.offset + info.length} "
                f"({index.fqn}) do not load: {type(exc).__name__}: {_first_sentence(exc)}"
            )
    more = [f"and {len(unreadable) - 2} more tensors"] if len(unreadable) > 2 else []
    return unreadable[:2] + more


def _compare_exports(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    """A resharded load must export the very tensors the save layout exported."""
    problems = []
    if set(got) != set(reference):
        problems.append(
            f"export after resharding has other tensors than at the save layout: "
            f"missing {sorted(set(reference) - set(got))[:3]}, extra {sorted(set(got) - set(reference))[:3]}"
        )
    for name in sorted(set(got) & set(reference)):
        if got[name].shape != reference[name].shape or not torch.equal(got[name], reference[name]):
            diff = (
                (got[name].double() - reference[name].double()).abs().max()
                if got[name].shape == reference[name].shape
                else "shape"
            )
            problems.append(f"{name} differs from the export at the save layout (max |diff| {diff})")
    return problems


# -- activations, for saying where logits first diverge --------------------------------------
def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _capture_megatron_activations(model: list, store: dict[str, torch.Tensor]) -> list[Any]:
    hooks = []
    for chunk in model:
        for layer in _unwrap(chunk).decoder.layers:
            n = layer.layer_number - 1  # Megatron numbers layers from 1, globally
            for part, module in (("self_attn", layer.self_attention), ("mlp", layer.mlp), ("output", layer)):

                def hook(_m: Any, _i: Any, out: Any, key: str = f"layer {n} {part}") -> None:
                    # A copy: in inference the bias-dropout-add adds the residual in place into
                    # this very tensor (megatron/core/fusions/fused_bias_dropout.py:49, 0.19.2).
                    store[key] = _first(out).transpose(0, 1).clone()  # [s, b, h] -> [b, s, h]

                hooks.append(module.register_forward_hook(hook))
    return hooks


def _capture_hf_activations(model: torch.nn.Module, store: dict[str, torch.Tensor]) -> list[Any]:
    import re

    hooks = []
    for name, module in model.named_modules():
        m = re.search(r"layers\.(\d+)(?:\.(self_attn|mlp))?$", name)
        if m:
            key = f"layer {m.group(1)} {m.group(2) or 'output'}"

            def hook(_m: Any, _i: Any, out: Any, key: str = key) -> None:
                store[key] = _first(out)

            hooks.append(module.register_forward_hook(hook))
    return hooks


def _load_megatron_activations(root: Path, tag: str) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for path in sorted(root.glob(f"megatron-{tag}-pp*.pt")):
        merged.update(torch.load(path))
    return merged


def _layer_order(key: str) -> tuple[int, int]:
    _, n, part = key.split()
    return int(n), ("self_attn", "mlp", "output").index(part)


def _first_divergence(meg: dict[str, torch.Tensor], hf: dict[str, torch.Tensor], tol: Any) -> str:
    for key in sorted(set(meg) & set(hf) - {"logits"}, key=_layer_order):
        if meg[key].shape != hf[key].shape:
            continue
        c = compare(meg[key], hf[key], tol)
        if not c.ok:
            return f"{key} (max |diff| {c.max_abs_diff:.3e}, up to {tol.atol:g} allowed)"
    return ""


# -- phases -------------------------------------------------------------------------------------
def _compare_values(model_params: dict[str, Any], expected: dict[str, torch.Tensor], what: str) -> list[str]:
    problems = []
    for key, p in model_params.items():
        if not torch.equal(p.detach().cpu(), expected[key]):
            d = (p.detach().cpu().double() - expected[key].double()).abs().max()
            problems.append(
                f"{what} {key.split('/', 1)[1]} (chunk {key.split('/')[0]}): max |diff| {d:.3e}, expected bit-exact"
            )
    return problems


def _save(run: RankRun) -> tuple[Any, list, Any, dict[str, torch.Tensor]]:
    bridge, model, peft = run.build(run.cell.layout)
    saved = run.fill_adapters(model, SAVE_SEED)
    run.save_checkpoint(model, peft)
    return bridge, model, peft, saved


def _load(run: RankRun, saved: dict[str, torch.Tensor] | None) -> tuple[Any, list, Any]:
    """A fresh model with other adapter values, then the checkpoint loaded through the filter."""
    bridge, model, peft = run.build(run.cell.load_layout)
    other = run.fill_adapters(model, OTHER_SEED)
    base_before = {k: v.detach().cpu().clone() for k, v in run.base_params(model).items()}
    if saved is not None:
        same = [k for k in other if torch.equal(other[k], saved[k])]
        agree([f"fresh model's adapter {k} already equals the saved values" for k in same[:3]])
    run.load_checkpoint(model, peft)
    problems = _compare_values(run.base_params(model), base_before, "base weight changed by adapter load:")
    if saved is not None:
        problems += _compare_values(run.adapter_params(model), saved, "adapter not restored:")
    else:
        problems += [
            f"adapter {k} still holds the fresh model's values after load"
            for k, p in run.adapter_params(model).items()
            if torch.equal(p.detach().cpu(), other[k])
        ][:3]
    agree(problems)
    if bridge_api.has_load_peft_adapter_checkpoint():
        # The bridge's own loader (0.5+) must restore exactly what the user-style load restored.
        restored = {k: p.detach().cpu().clone() for k, p in run.adapter_params(model).items()}
        run.fill_adapters(model, OTHER_SEED)
        try:
            bridge_api.load_peft_adapter_checkpoint(model, run.paths.checkpoint, peft)
            problems = _compare_values(run.adapter_params(model), restored, "load_peft_adapter_checkpoint:")
        except Exception as exc:  # its failure is a finding, reported on every rank alike
            traceback.print_exc()  # the full stack stays in this rank's log
            problems = [f"load_peft_adapter_checkpoint raised {type(exc).__name__}: {exc}"]
        agree(problems)
    return bridge, model, peft


def run_phase(cell: Cell, phase: str, paths: Paths, backend: Backend) -> dict[str, Any]:
    """Run this rank's part of ``phase``; rank 0 returns the metrics of the comparison."""
    import time

    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[step] = round(now - clock, 2)
        clock = now

    global _HARNESS_GROUP
    _HARNESS_GROUP = dist.new_group(backend="gloo")
    run = RankRun(cell, paths, backend)
    run.ensure_hf_model()
    lap("hf model")
    if phase == "save":
        bridge, model, peft, _ = _save(run)
        run.export(bridge, model, peft, paths.reference_adapter)
        return {}
    saved = None
    if phase == "roundtrip":
        _, _, _, saved = _save(run)
        lap("build, fill, save")
    bridge, model, peft = _load(run, saved)
    lap("build, load, verify")
    run.forward(model)
    lap("forward")
    run.export(bridge, model, peft, paths.adapter)
    lap("export")
    megatron_merged = run.merged(bridge, model, peft)
    lap("merged")
    if run.rank != 0:
        return {}
    try:
        metrics = run.compare_with_peft(paths.reference_adapter if phase == "load" else None, megatron_merged)
    except CheckFailed as exc:
        lap("hf side")
        if len(exc.args) > 1:
            exc.args[1]["seconds_by_step"] = timings
        raise
    lap("hf side")
    metrics["seconds_by_step"] = timings
    return metrics
