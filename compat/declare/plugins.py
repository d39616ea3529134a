"""Code of the user's that a cell runs in place of the bridge's: an exporter, a saver, a loader.

Each is named ``"package.module:function"`` and imported in the ranks from the caller's
``sys.path``/``PYTHONPATH``:

- exporter ``export(bridge, model, peft, path, base)``: writes an HF PEFT adapter directory at
  ``path`` (``base``: the HF base model it adapts). Default: ``AutoBridge.save_hf_adapter``.
- saver ``save(bridge, model, peft, path)``: writes the adapter checkpoint of this rank's model
  chunks to ``path``. Default: the bridge's PEFT filter and ``dist_checkpointing.save``.
- loader ``load(bridge, model, peft, path)``: restores it into a model at any layout, from the
  ``path`` the saver was given. Default: the same filter, ``dist_checkpointing.load``, non-strict
  ``load_state_dict``.

A saver or exporter that writes a layout of its own returns the directory it wrote inside
``path`` (verl's ``path/model/dist_ckpt``, ``path/model/huggingface/adapter``): the checks read
that one. Whoever wrote it, a Megatron dist checkpoint is checked for its contents and loaded a
second time by the bridge's own loader. A user's plugin runs with ``TMPDIR`` inside the cell's
directory, and its checkpoint calls are noted in the cell's record (``compat.rank.plugin_calls``).

All three run on every rank of the cell, where the defaults run (so they may use collectives):
``bridge`` is the ``AutoBridge``, ``model`` this rank's list of Megatron model chunks, ``peft`` the
bridge's PEFT object, ``path``/``base`` :class:`pathlib.Path` objects. Every check of the cell
applies to what they wrote. :func:`check` refuses a name that does not import or is not callable
before any rank starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compat.rank.paths import CellPaths

__all__ = ["ROLES", "PluginError", "Plugins", "Resolved", "check", "load_callable", "plugin_name", "with_paths"]

ROLES = ("exporter", "saver", "loader")
IMPORT_TIMEOUT = 600  # seconds for the child that imports the plugins (verl and megatron: about 50 s cold)


class PluginError(ValueError):
    """A plugin name that is malformed, does not import, or is not callable: bad input."""


@dataclass(frozen=True)
class Plugins:
    """The names of a cell's plugins; None is the default (the bridge's own path)."""

    exporter: str | None = None
    saver: str | None = None
    loader: str | None = None

    def __post_init__(self) -> None:
        for role in ROLES:
            name = getattr(self, role)
            if name is not None:
                _split(name, role)

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Plugins:
        return cls(**{k: v for k, v in (data or {}).items() if k in ROLES})

    def named(self) -> dict[str, str]:
        return {role: name for role, name in self.as_dict().items() if name}

    def search_paths(self) -> list[str]:
        """The directories of this process's ``sys.path`` the named modules import from.

        Ranks are other processes: these go in front of their PYTHONPATH, so they import the code the
        caller sees (a package installed or not, a test directory pytest put on ``sys.path``).
        """
        out = []
        for name in self.named().values():
            top = name.partition(":")[0].split(".")[0]
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                continue
            locations = list(spec.submodule_search_locations or []) if spec else []
            origin = (locations[0] if locations else None) or (spec.origin if spec else None)
            if origin and origin not in ("built-in", "frozen"):
                path = str(Path(origin).resolve().parent)
                if path not in out:
                    out.append(path)
        return out

    def resolve(self, defaults: Mapping[str, Callable[..., Any]], recording: Callable[..., Any]) -> Resolved:
        """The callables, a role not named taking its default (in a rank: imports the user's modules).

        The defaults (the bridge's saver, loader, exporter) and what records a user's plugin's calls
        (``compat.rank.plugin_calls.recording``) come from the rank side (``compat.rank.roundtrip.DEFAULT_PLUGINS``):
        a configuration module imports nothing it configures.
        """
        return Resolved(
            exporter=load_callable(self.exporter, "exporter") if self.exporter else defaults["exporter"],
            saver=load_callable(self.saver, "saver") if self.saver else defaults["saver"],
            loader=load_callable(self.loader, "loader") if self.loader else defaults["loader"],
            named=self.named(),
            recording=recording,
        )


@dataclass(frozen=True)
class Resolved:
    exporter: Callable[..., Any]
    saver: Callable[..., Any]
    loader: Callable[..., Any]
    named: dict[str, str] = field(default_factory=dict)  # the user's plugins, by role
    recording: Callable[..., Any] | None = None  # compat.rank.plugin_calls.recording, given by the rank

    def call(self, role: str, paths: CellPaths, built: Any, path: Path, *rest: Any) -> tuple[Path, list[str]]:
        """Run ``role`` on ``path``: (the directory it wrote, problems with what it returned).

        A user's plugin runs under :func:`compat.rank.plugin_calls.recording`; rank 0 records the call.
        """
        fn = getattr(self, role)
        if role not in self.named or self.recording is None:
            fn(built.bridge, built.model, built.peft, path, *rest)
            return path, []
        notes: list[dict[str, Any]] = []
        with self.recording(paths, built.bridge, notes):
            returned = fn(built.bridge, built.model, built.peft, path, *rest)
        wrote, problems = _written(role, self.named[role], returned, path, paths)
        if _rank() == 0:
            entry = {"role": role, "plugin": self.named[role], "asked": paths.relative(path), "calls": notes}
            paths.record_plugin_call({**entry, "wrote": paths.relative(wrote)} if role != "loader" else entry)
        return wrote, problems


def _written(role: str, name: str, returned: Any, asked: Path, paths: CellPaths) -> tuple[Path, list[str]]:
    """The directory a plugin says it wrote: ``asked`` if it returned None; inside the cell's directory."""
    if returned is None or role == "loader":
        return asked, []
    if not isinstance(returned, str | os.PathLike):
        return asked, [f"{role} {name} returned {returned!r}: return the directory it wrote, or None"]
    wrote = Path(os.path.abspath(returned))
    if not wrote.is_relative_to(os.path.abspath(paths.root)):
        return asked, [f"{role} {name} returned {wrote}, outside the cell's directory {paths.root}: write in {asked}"]
    return wrote, []


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _split(name: str, role: str) -> tuple[str, str]:
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr or not all(p.isidentifier() for p in [*module.split("."), *attr.split(".")]):
        raise PluginError(
            f"{role} {name!r} is not 'package.module:function' (e.g. 'myproject.checkpoint:export_adapter')"
        )
    return module, attr


def plugin_name(plugin: str | Callable[..., Any], role: str = "plugin") -> str:
    """``package.module:function`` for a name or for a module-level function (ranks import it by name)."""
    if isinstance(plugin, str):
        return plugin
    module, qualname = getattr(plugin, "__module__", None), getattr(plugin, "__qualname__", "")
    if not callable(plugin) or not module or not qualname:
        raise PluginError(f"{role} {plugin!r} is neither 'package.module:function' nor a function")
    if "<" in qualname or module == "__main__":  # <locals>, <lambda>: nothing another process can import
        raise PluginError(
            f"{role} {module}.{qualname} cannot be imported by name in the ranks (other processes): "
            "pass a function defined at the top level of an importable module, or its 'package.module:function'"
        )
    return f"{module}:{qualname}"


def load_callable(name: str, role: str = "plugin") -> Callable[..., Any]:
    """Import ``package.module:function`` and return it; :class:`PluginError` says what is wrong."""
    module_name, attr = _split(name, role)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(
            f"{role} {name!r}: module {module_name!r} does not import ({type(exc).__name__}: {exc}); "
            "is its directory on PYTHONPATH (ranks import it from the caller's path)?"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{role} {name!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{role} {name!r} is a {type(obj).__name__}, not a callable")
    return obj


_checked: set[tuple[str, str]] = set()


def check(plugins: Plugins, backend: str) -> None:
    """Import every named plugin as a rank would, in a child process; :class:`PluginError` if one fails.

    A child process, because user code importing megatron needs the rank's workarounds (which
    are never applied in the caller's process). Checked once per name and backend per process.
    """
    todo = {role: name for role, name in plugins.named().items() if (name, backend) not in _checked}
    if not todo:
        return
    env = {**os.environ, "PYTHONPATH": with_paths(os.environ.get("PYTHONPATH", ""), plugins.search_paths())}
    if backend == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "compat.rank.plugin_import", backend, json.dumps(todo)],
            capture_output=True,
            text=True,
            env=env,
            timeout=IMPORT_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise PluginError(
            f"importing {', '.join(todo.values())} as a rank would took over {IMPORT_TIMEOUT} s "
            "(an overloaded machine, or a module that blocks at import)"
        ) from None
    errors = [line.removeprefix("error: ") for line in proc.stdout.splitlines() if line.startswith("error: ")]
    if errors:
        raise PluginError("; ".join(errors))
    if proc.returncode != 0:
        raise PluginError(f"importing {', '.join(todo.values())} failed:\n{proc.stderr[-3000:]}")
    _checked.update((name, backend) for name in todo.values())


def with_paths(pythonpath: str, paths: list[str]) -> str:
    """``paths`` in front of a PYTHONPATH value, each once, relative entries made absolute."""
    entries = [*paths, *(os.path.abspath(p) for p in pythonpath.split(os.pathsep) if p)]
    return os.pathsep.join(dict.fromkeys(entries))
