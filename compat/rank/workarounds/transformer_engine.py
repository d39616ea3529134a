"""Let megatron-bridge import and run without Transformer Engine (TE).

Upstream code this answers (megatron-bridge 0.6.2; the set of modules differs by release):
- ``megatron/bridge/peft/lora_layers.py:20``: ``import transformer_engine.pytorch as te`` at
  module level, used only for ``isinstance`` checks and the TE op-fuser path; in 0.4.x/0.5.x
  ``megatron/bridge/peft/lora.py`` does the same. The modules are found by scanning the
  installed bridge for module-level TE imports, not listed by hand.
- ``megatron/bridge/peft/utils.py:86``: ``HAVE_TE`` is computed from megatron-core's TE
  wrapper classes, which megatron-core defines even without TE, so it is True and
  ``get_adapter_attributes_from_linear`` then calls ``isinstance(m, None)``.

How: a meta-path finder that, only while one of those modules' bodies executes, offers a
stand-in ``transformer_engine.pytorch`` whose classes are never instantiated. The module's
other imports run first, so no other module ever sees TE as present, and the stand-in is
removed from ``sys.modules`` again right after. Applied only when TE is not importable.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
import types
from pathlib import Path

__all__ = ["apply", "modules_importing_te", "needed"]

_TOP_LEVEL_TE_IMPORT = re.compile(r"^(?:import|from)\s+transformer_engine\b", re.MULTILINE)


def needed() -> bool:
    return importlib.util.find_spec("transformer_engine") is None


def modules_importing_te(package: str = "megatron.bridge") -> set[str]:
    """Modules of ``package`` with an unguarded (column-0) import of transformer_engine."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return set()
    root = Path(next(iter(spec.submodule_search_locations)))
    found = set()
    for path in root.rglob("*.py"):
        if _TOP_LEVEL_TE_IMPORT.search(path.read_text(errors="replace")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.add(".".join((package, *parts)))
    return found


def _stand_in() -> dict[str, types.ModuleType]:
    te = types.ModuleType("transformer_engine")
    te_pytorch = types.ModuleType("transformer_engine.pytorch")

    class _Absent:
        """Transformer Engine is not installed: nothing is ever an instance of this."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("Transformer Engine is not installed (compat stand-in)")

    for name in ("Linear", "LayerNormLinear"):
        setattr(te_pytorch, name, type(name, (_Absent,), {}))
    vars(te_pytorch)["ops"] = types.SimpleNamespace(Sequential=type("Sequential", (_Absent,), {}))
    vars(te)["pytorch"] = te_pytorch
    return {"transformer_engine": te, "transformer_engine.pytorch": te_pytorch}


class _StandInLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        source = self.inner.get_source(module.__name__) or ""  # type: ignore[attr-defined]
        for line in source.splitlines():
            m = re.match(r"^(?:import|from)\s+([\w.]+)", line)
            if m and not m.group(1).startswith(("transformer_engine", ".")):
                importlib.import_module(m.group(1))
        stand_in = _stand_in()
        sys.modules.update(stand_in)
        try:
            self.inner.exec_module(module)
        finally:
            for name in stand_in:
                sys.modules.pop(name, None)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, targets: set[str]) -> None:
        self.targets = targets

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name not in self.targets:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _StandInLoader(spec.loader)
        return spec


def apply() -> None:
    """Install the finder, import the bridge's PEFT utilities, and turn off their TE paths."""
    sys.meta_path.insert(0, _Finder(modules_importing_te()))
    import megatron.bridge.peft.utils as peft_utils

    peft_utils.HAVE_TE = False
