"""What a user's plugin did in a rank: the checkpoint calls it made, from which of its functions, and where.

A downstream's checkpoint manager (verl's ``MegatronCheckpointManager``) reaches the same few
primitives the harness's defaults call: ``dist_checkpointing.save`` / ``load``, the bridge's PEFT
filter, ``AutoBridge.save_hf_adapter``, ``Module.load_state_dict``. While a plugin runs, each is
wrapped to note its path argument (relative to the cell's directory), what it returned where that
matters (a load's missing and unexpected keys, which a non-strict caller may ignore) and the
plugin's own frames that led to it, innermost first (``verl.utils.megatron.dist_checkpointing:53
save_dist_checkpointing``). Rank 0's notes go into the cell's record (``metrics.plugin_calls``).

The plugin also runs with ``TMPDIR`` inside the cell's directory, so its temporary files (verl's
``ckpt_<hash>.lock`` per directory it creates) are the cell's, not the machine's.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from compat.rank.adapter_state import is_adapter
from compat.rank.paths import CellPaths

__all__ = ["PRIMITIVES", "recording"]

# (module, attribute, the argument that names a path or None). A caller that bound one of these
# with ``from module import name`` before the plugin ran calls the original: only attribute
# lookups at call time (verl's ``dist_checkpointing.save(...)``) are seen.
PRIMITIVES = (
    ("megatron.core.dist_checkpointing", "save", "checkpoint_dir"),
    ("megatron.core.dist_checkpointing", "load", "checkpoint_dir"),
    ("megatron.bridge.training.checkpointing", "apply_peft_adapter_filter_to_state_dict", None),
    ("torch.nn.modules.module", "Module.load_state_dict", None),
)
# Frames of these packages are the machinery, not the plugin's code.
_NOT_THE_PLUGIN = ("compat", "torch", "megatron", "contextlib", "functools", "transformers", "peft")
_FRAMES = 8


@contextlib.contextmanager
def recording(paths: CellPaths, bridge: Any, notes: list[dict[str, Any]]) -> Iterator[None]:
    """While the body runs: each primitive call is appended to ``notes``; temp files go to ``paths.plugin_tmp``."""
    root = paths.root
    undo: list[Callable[[], None]] = []
    try:
        for module, attr, path_arg in PRIMITIVES:
            owner, name = _owner(module, attr)
            if owner is not None:
                undo.append(_wrap(owner, name, f"{module}.{attr}", path_arg, root, notes))
        if hasattr(bridge, "save_hf_adapter"):
            undo.append(_wrap(bridge, "save_hf_adapter", "AutoBridge.save_hf_adapter", "path", root, notes))
        with _tmpdir(paths.plugin_tmp):
            yield
    finally:
        for restore in reversed(undo):
            restore()


def _owner(module: str, attr: str) -> tuple[Any, str]:
    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        return None, attr
    *parents, name = attr.split(".")
    for part in parents:
        obj = getattr(obj, part, None)
    return (obj, name) if obj is not None and hasattr(obj, name) else (None, name)


def _wrap(owner: Any, name: str, label: str, path_arg: str | None, root: Path, notes: list) -> Callable[[], None]:
    """Replace ``owner.name`` (a module's, a class's or an instance's) by a noting wrapper; return the undo."""
    instance_had_none = not isinstance(owner, type | ModuleType) and name not in vars(owner)
    original = getattr(owner, name)  # a class's plain function takes self; an instance's is bound
    signature = _signature(original)
    is_load = label.endswith("load_state_dict")

    def noted(*args: Any, **kwargs: Any) -> Any:
        note: dict[str, Any] = {"call": label, "by": _plugin_frames()}
        if path_arg and _argument(signature, args, kwargs, path_arg) is not None:
            note["path"] = _relative(Path(_argument(signature, args, kwargs, path_arg)), root)
        if is_load:
            note["strict"] = bool(_argument(signature, args, kwargs, "strict", default=True))
        start = time.monotonic()
        out = original(*args, **kwargs)
        note["seconds"] = round(time.monotonic() - start, 3)
        if is_load and hasattr(out, "missing_keys"):  # what a non-strict caller may have ignored
            note["missing_adapter_keys"] = sum(1 for k in out.missing_keys if is_adapter(k))
            note["missing_base_keys"] = len(out.missing_keys) - note["missing_adapter_keys"]
            note["unexpected_keys"] = len(out.unexpected_keys)
        if note["by"] or not is_load:  # a load_state_dict inside the machinery is not the plugin's call
            notes.append(note)
        return out

    setattr(owner, name, noted)
    return (lambda: delattr(owner, name)) if instance_had_none else (lambda: setattr(owner, name, original))


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _argument(signature: inspect.Signature | None, args: tuple, kwargs: dict, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if signature is None:
        return default
    names = list(signature.parameters)
    if name not in names:
        return default
    position = names.index(name)
    return args[position] if position < len(args) else signature.parameters[name].default


def _plugin_frames() -> list[str]:
    """``module:line function`` of the calling frames outside the machinery, innermost first."""
    out: list[str] = []
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and len(out) < _FRAMES:
        top = frame.f_globals.get("__name__", "").split(".")[0]
        if top == "compat" and out:  # the harness, calling the plugin: the plugin's frames end here
            break
        if top not in _NOT_THE_PLUGIN:
            out.append(f"{frame.f_globals['__name__']}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return out


def _relative(path: Path, root: Path) -> str:
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


@contextlib.contextmanager
def _tmpdir(where: Path) -> Iterator[None]:
    where.mkdir(parents=True, exist_ok=True)
    before_env, before_cached = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(where), None
    try:
        yield
    finally:
        if before_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before_env
        tempfile.tempdir = before_cached
