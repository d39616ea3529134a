"""Code of the user's that a cell runs in place of the bridge's: an exporter, a saver, a loader.

Each is named ``"package.module:function"`` and imported in the ranks from the caller's
``sys.path``/``PYTHONPATH``:

- exporter ``export(bridge, model, peft, path, base)``: writes an HF PEFT adapter directory at
  ``path`` (``base``: the HF base model it adapts). Default: ``AutoBridge.save_hf_adapter``.
- saver ``save(bridge, model, peft, path)``: writes the adapter checkpoint of this rank's model
  chunks to ``path``. Default: the bridge's PEFT filter and ``dist_checkpointing.save``.
- loader ``load(bridge, model, peft, path)``: restores it into a model at any layout. Default:
  the same filter, ``dist_checkpointing.load``, non-strict ``load_state_dict``.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ROLES", "PluginError", "Plugins", "Resolved", "check", "load_callable", "plugin_name", "with_paths"]

ROLES = ("exporter", "saver", "loader")


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
            origin = (spec.submodule_search_locations or [None])[0] if spec else None
            origin = origin or (spec.origin if spec else None)
            if origin and origin not in ("built-in", "frozen"):
                path = str(Path(origin).resolve().parent)
                if path not in out:
                    out.append(path)
        return out

    def resolve(self, defaults: dict[str, Callable[..., None]]) -> Resolved:
        """The callables, a role not named taking its default (in a rank: imports the user's modules).

        The defaults (the bridge's saver, loader, exporter) come from the rank side
        (``compat.roundtrip.DEFAULT_PLUGINS``): a configuration module imports nothing it configures.
        """
        return Resolved(
            exporter=load_callable(self.exporter, "exporter") if self.exporter else defaults["exporter"],
            saver=load_callable(self.saver, "saver") if self.saver else defaults["saver"],
            loader=load_callable(self.loader, "loader") if self.loader else defaults["loader"],
            checks_bridge_loader=self.saver is None,
        )


@dataclass(frozen=True)
class Resolved:
    exporter: Callable[..., None]
    saver: Callable[..., None]
    loader: Callable[..., None]
    # The bridge's own loader must read the default saver's checkpoint too; another format, not.
    checks_bridge_loader: bool


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
    proc = subprocess.run(
        [sys.executable, "-m", "compat.plugin_import", backend, json.dumps(todo)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
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
