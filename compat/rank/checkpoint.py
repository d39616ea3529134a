"""The adapter checkpoint: saved and loaded through the bridge's PEFT filter, checked, and diagnosed.

A saver writes the adapter state of a rank's model chunks to a directory; a loader restores it
into a model built at the same or another layout. The defaults are the path users take (the
bridge's ``apply_peft_adapter_filter_to_state_dict``, then ``dist_checkpointing.save`` /
``load`` non-strict); a downstream checkpoint manager plugs in its own (``compat.declare.plugins``).
Whatever wrote it, a Megatron dist checkpoint is checked to hold every adapter tensor the filter
names and no base tensor, and one that does not load is diagnosed file by file
(:func:`damaged_files` is pure: it reads only the directory).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from compat.rank import bridge_api
from compat.rank.adapter_state import is_adapter
from compat.rank.model_build import unwrap

__all__ = [
    "LoadMismatch",
    "adapter_shards",
    "check_contents",
    "damaged_files",
    "default_loader",
    "default_saver",
    "is_dist_checkpoint",
    "unloadable",
    "written_by",
]


class LoadMismatch(ValueError):
    """The checkpoint's keys and the model's adapter parameters do not line up."""


def default_saver(bridge: Any, model: list, peft: Any, path: Path) -> None:
    """Adapter tensors only: the bridge's PEFT filter over the model's sharded state dict."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(bridge_api.adapter_filter(bridge_api.model_sections(model), peft), str(path))


def default_loader(bridge: Any, model: list, peft: Any, path: Path) -> None:
    """The way users load (verl-style): the same filter, ``dist_checkpointing.load``, non-strict."""
    from megatron.core import dist_checkpointing

    sections = bridge_api.adapter_filter(bridge_api.model_sections(model), peft)
    loaded = dist_checkpointing.load(sections, str(path))
    problems = []
    for i, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{i}"
        result = unwrap(chunk).load_state_dict(loaded[key], strict=False)
        unexpected = list(result.unexpected_keys)
        missing_adapters = [k for k in result.missing_keys if is_adapter(k)]
        if unexpected:
            problems.append(f"chunk {i}: checkpoint keys match no parameter: {unexpected[:3]}")
        if missing_adapters:
            problems.append(f"chunk {i}: adapter tensors not restored: {missing_adapters[:3]}")
    if problems:
        raise LoadMismatch("; ".join(problems))


def adapter_shards(model: list) -> list[tuple[str, tuple[int, ...]]]:
    """(key, global offset) of this rank's adapter shards, from the model's whole sharded state dict.

    Not through the bridge's filter: a filter that drops an adapter tensor must show as missing.
    Factories (split tensors such as fused gate/up) count by key alone.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = set()
    for section in bridge_api.model_sections(model).values():
        for v in nested_values(section) if isinstance(section, dict) else []:
            if isinstance(v, ShardedTensor) and is_adapter(v.key) and v.flattened_range is None:
                out.add((v.key, tuple(v.global_offset)))
            elif isinstance(v, ShardedTensor | ShardedTensorFactory) and is_adapter(v.key):
                out.add((v.key, ()))
    return sorted(out)


def is_dist_checkpoint(path: Path) -> bool:
    """A Megatron dist checkpoint (what the default saver writes) has ``metadata.json`` and torch DCP metadata."""
    return (path / "metadata.json").is_file() and (path / ".metadata").is_file()


def check_contents(path: Path, wanted: set[tuple[str, tuple[int, ...]]]) -> list[str]:
    """The checkpoint holds every adapter shard of every rank, and nothing of the base model."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    every = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    metadata = {k: m for k, m in every.items() if isinstance(m, TensorStorageMetadata)}  # not common state
    stored = {(key, tuple(chunk.offsets)) for key, meta in metadata.items() for chunk in meta.chunks}
    problems = []
    base = sorted(k for k in metadata if not is_adapter(k))
    if base:
        problems.append(f"checkpoint holds {len(base)} base-model tensors, e.g. {base[:3]}")
    missing = sorted((k, o) for k, o in wanted if k not in metadata or (o and (k, o) not in stored))
    if missing:
        shown = [f"{k} at offset {o}" if o else k for k, o in missing[:3]]
        problems.append(f"checkpoint lacks {len(missing)} of {len(wanted)} adapter shards, e.g. {shown}")
    if not wanted:
        problems.append("the model has no adapter tensor to save")
    return problems


def written_by(path: Path, model: list, params: list[str]) -> list[str]:
    """Which rank wrote the checkpoint's copy of each of these adapter parameters (``"<chunk>/<name>"``).

    Under data parallelism one replica of a shard is written and every other reloads it: a replica
    that reloads other values than it holds is told whose copy it got. The writer is the rank in the
    name of the file holding the copy (``__<rank>_<n>.distcp``, torch's ``FileSystemWriter``).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(path)).read_metadata().storage_data
    files = {(index.fqn, tuple(index.offset or ())): info.relative_path for index, info in storage.items()}
    by_param = {
        (v.data.data_ptr(), tuple(v.data.shape)): v
        for section in bridge_api.model_sections(model).values()
        for v in (nested_values(section) if isinstance(section, dict) else [])
        if isinstance(v, ShardedTensor) and v.flattened_range is None and is_adapter(v.key)
    }
    named = {f"{i}/{n}": p for i, chunk in enumerate(model) for n, p in chunk.named_parameters()}
    out = []
    for key in params:
        p = named.get(key)
        shard = by_param.get((p.data_ptr(), tuple(p.shape))) if p is not None else None
        name = files.get((shard.key, tuple(shard.global_offset))) if shard is not None else None
        writer = re.match(r"__(\d+)_", name or "")
        if shard is not None and writer:
            out.append(
                f"its copy in the checkpoint ({shard.key} at offset {tuple(shard.global_offset)}) "
                f"was written by rank {writer.group(1)} ({name})"
            )
    return out


def unloadable(checkpoint: Path, exc: BaseException) -> str:
    """Why loading raised, naming the checkpoint file at fault where it can."""
    files = damaged_files(checkpoint) if (checkpoint / ".metadata").exists() else []
    # named as inside the cell's directory (checkpoint/...): a problem reads the same in every run
    where = "; ".join(files) if files else f"no file of {checkpoint.name}/ is short, missing or unreadable"
    return f"cannot load the adapter checkpoint {checkpoint.name}/: {where} (load raised {_cause(exc)})"


def _cause(exc: BaseException) -> str:
    """The first line of the error; for torch's CheckpointException, of the first rank's error."""
    from compat.checks.upstream import first_line

    rank = ""
    failures = getattr(exc, "failures", None)  # CheckpointException: {rank: (exception, stack)}
    if isinstance(failures, dict) and failures:
        r, failure = sorted(failures.items(), key=lambda kv: kv[0])[0]
        exc, rank = (failure[0] if isinstance(failure, tuple) else failure), f" on checkpoint rank {r}"
    return f"{type(exc).__name__}: {first_line(exc, 160)}{rank}"


def damaged_files(checkpoint: Path) -> list[str]:
    """Shard files that are missing, shorter than the metadata says, or hold a tensor that won't load.

    A tensor item is a ``torch.save`` blob at (offset, length) of its file: each is loaded on its
    own, so a corrupted one is named with its file, byte range and tensor.
    """
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from compat.checks.upstream import first_line

    try:
        metadata = FileSystemReader(str(checkpoint)).read_metadata()
    except Exception as exc:
        return [f"its metadata {checkpoint.name}/.metadata cannot be read ({type(exc).__name__}: {first_line(exc)})"]
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
                f"({index.fqn}) do not load: {type(exc).__name__}: {first_line(exc, 160)}"
            )
    more = [f"and {len(unreadable) - 2} more tensors"] if len(unreadable) > 2 else []
    return unreadable[:2] + more
