"""Patch an upstream function right after its module is imported, in whatever process imports it.

A meta-path finder that wraps the loader of the named modules: the module body runs unchanged,
then the patches run on the finished module. Nothing upstream is imported early, so the harness
still applies its own workarounds (Transformer Engine stand-in) before megatron loads. Other
finders may later insert themselves ahead of this one (the TE workaround does); the finder moves
back to the front the next time any import consults it, and always asks the finders behind it
for the real spec, so it composes with theirs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable

__all__ = ["install", "patch_attribute"]

Patch = Callable[[types.ModuleType], None]


def patch_attribute(module: types.ModuleType, path: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``module.<path>`` (``Class.method`` or ``function``) by ``wrap(original)``.

    Classmethods and staticmethods are unwrapped for ``wrap`` and re-wrapped after. An empty
    ``path`` calls ``wrap(module)`` itself: something done while the module is imported.
    """
    if not path:
        wrap(module)
        return
    *owners, name = path.split(".")
    owner: object = module
    for part in owners:
        owner = getattr(owner, part)
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if isinstance(raw, classmethod):
        new: object = classmethod(wrap(raw.__func__))
    elif isinstance(raw, staticmethod):
        new = staticmethod(wrap(raw.__func__))
    else:
        new = wrap(raw)
    setattr(owner, name, new)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, patches: list[Patch]) -> None:
        self.inner, self.patches = inner, patches

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.inner.exec_module(module)
        for patch in self.patches:
            patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, patches: dict[str, list[Patch]]) -> None:
        self.patches = patches

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if sys.meta_path[0] is not self:  # someone inserted ahead of us: go back to the front
            sys.meta_path.remove(self)
            sys.meta_path.insert(0, self)
        if name not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, self.patches.pop(name))
                return spec
        return None


def install(patches: dict[str, list[Patch]]) -> None:
    """Run ``patches[module]`` on each module right after it is imported (once)."""
    already = [name for name in patches if name in sys.modules]
    for name in already:  # imported before us (unusual): patch now
        for patch in patches.pop(name):
            patch(sys.modules[name])
    sys.meta_path.insert(0, _Finder(patches))
