"""The adapter round trip, as each rank of a cell runs it.

bridge -> provider at the layout -> LoRA through the pre-wrap hook -> Megatron model -> seeded
non-zero adapter values -> adapter-only dist checkpoint through the PEFT filter -> a fresh model
with other values -> load through the filter -> ``save_hf_adapter`` -> rank 0: the HF base model
and ``peft.PeftModel`` from the written files, logits compared with Megatron's.

Every check collects problems per rank and calls :func:`agree`, so a failing check ends every
rank together with one reason instead of leaving ranks blocked in the next collective.
"""

from __future__ import annotations

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


def _upstream_frame(exc: BaseException) -> str:
    """``file:line`` of the innermost frame in site-packages code, relative to site-packages."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"


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

    def activations(self, pp_rank: int) -> Path:
        return self.root / f"megatron-activations-pp{pp_rank}.pt"


@dataclass
class Outcome:
    """What rank 0 reports besides pass/fail."""

    metrics: dict[str, Any] = field(default_factory=dict)


def agree(problems: list[str]) -> None:
    """Exchange problems between all ranks; raise the same :class:`CheckFailed` on every rank."""
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    merged: list[str] = []
    for rank, rank_problems in enumerate(gathered):
        for problem in rank_problems or []:
            if problem not in merged and all(problem not in m for m in merged):
                merged.append(f"rank {rank}: {problem}")
    if merged:
        shown = merged[:8] + ([f"... and {len(merged) - 8} more"] if len(merged) > 8 else [])
        raise CheckFailed("; ".join(shown))


def _barrier() -> None:
    dist.barrier()


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
                f"{self.family.architecture} ({where.split('site-packages/')[-1]}:{line}, "
                "AutoBridge.list_supported_models)"
            )
        try:
            return self._build(AutoBridge, local_layer_spec, layout)
        except ImportError as exc:
            raise Unsupported(f"needs {exc.name or exc}: imported at {_upstream_frame(exc)}") from exc

    def _build(self, AutoBridge: Any, local_layer_spec: Any, layout: Layout) -> tuple[Any, list, Any]:
        bridge = AutoBridge.from_hf_pretrained(str(self.paths.hf), torch_dtype=self.dtype)
        provider = bridge.to_megatron_provider(load_weights=True)
        provider.transformer_layer_spec = local_layer_spec
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
    def _coords(self, name: str) -> str:
        """Which shard a tensor is: equal on replicas (DP), distinct across TP/PP/EP/ETP ranks."""
        ps = self.ps
        pp = ps.get_pipeline_model_parallel_rank()
        if _is_expert(name):
            return f"pp{pp}-ep{ps.get_expert_model_parallel_rank()}-etp{ps.get_expert_tensor_parallel_rank()}"
        return f"pp{pp}-tp{ps.get_tensor_model_parallel_rank()}"

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
                g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{self._coords(key)}/{key}".encode()))
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
        dist.all_gather_object(every, mine)
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
            result = chunk.load_state_dict(loaded[key], strict=False)
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

    def forward(self, model: list) -> None:
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
                self.paths.activations(ps.get_pipeline_model_parallel_rank()),
            )
        _barrier()

    def export(self, bridge: Any, model: list, peft: Any, path: Path) -> None:
        bridge_api.save_hf_adapter(bridge, model, path, peft, self.paths.hf)
        _barrier()

    # -- rank 0: the HF side ---------------------------------------------------------------
    def compare_with_peft(self, reference: Path | None) -> dict[str, Any]:
        """Check the exported files, load them with ``peft``, compare logits with Megatron's."""
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        problems = check_adapter_dir(self.paths.adapter, self.adapter, self.paths.hf)
        if reference is not None:
            problems += _compare_exports(
                load_file(self.paths.adapter / "adapter_model.safetensors"),
                load_file(reference / "adapter_model.safetensors"),
            )
        if problems:
            raise CheckFailed("; ".join(problems))
        hf = AutoModelForCausalLM.from_pretrained(str(self.paths.hf), dtype=self.dtype).eval()
        ids = self.input_ids().cpu()
        with torch.no_grad():
            base_logits = hf(ids).logits
        peft_model = PeftModel.from_pretrained(hf, str(self.paths.adapter)).eval()
        problems += check_loaded_by_peft(peft_model, self.paths.adapter)
        hf_acts: dict[str, torch.Tensor] = {}
        hooks = _capture_hf_activations(peft_model, hf_acts)
        with torch.no_grad():
            peft_logits = peft_model(ids).logits
        for h in hooks:
            h.remove()
        meg = _load_megatron_activations(self.paths.root)
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
        if problems:
            raise CheckFailed("; ".join(problems), metrics)
        return metrics


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


def _load_megatron_activations(root: Path) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    for path in sorted(root.glob("megatron-activations-pp*.pt")):
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
    return bridge, model, peft


def run_phase(cell: Cell, phase: str, paths: Paths, backend: Backend) -> dict[str, Any]:
    """Run this rank's part of ``phase``; rank 0 returns the metrics of the comparison."""
    run = RankRun(cell, paths, backend)
    run.ensure_hf_model()
    if phase == "save":
        bridge, model, peft, _ = _save(run)
        run.export(bridge, model, peft, paths.reference_adapter)
        return {}
    saved = None
    if phase == "roundtrip":
        _, _, _, saved = _save(run)
    bridge, model, peft = _load(run, saved)
    run.forward(model)
    run.export(bridge, model, peft, paths.adapter)
    if run.rank != 0:
        return {}
    return run.compare_with_peft(paths.reference_adapter if phase == "load" else None)
