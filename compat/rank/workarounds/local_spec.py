"""Build a model with megatron-core's *local* layer spec where the bridge asks for Transformer Engine.

Upstream code this answers (megatron-bridge 0.6.2): the GPT provider's default layer spec is the TE
one (``megatron/bridge/models/gpt_provider.py``, ``default_layer_spec`` /
``transformer_engine_layer_spec``); family bridges build their own specs with
``partial(fn, use_transformer_engine=HAVE_TE)`` (MLA, shared experts, dense first layers) or edit
the GPT default (OLMoE). Used only for cells of the ``local`` spec; the ``te`` spec keeps the
bridge's own choice. A family-specific spec that cannot be built without TE, or names a TE class,
is :class:`Unsupported` with the spec function's file and line.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from compat.checks.findings import Unsupported
from compat.checks.upstream import describe, upstream_path

__all__ = ["layer_spec_without_te", "te_classes", "te_names_absent"]


def layer_spec_without_te(spec: Any, local_layer_spec: Any, provider: Any) -> Any:
    """The layer spec to build with, Transformer Engine left out (see the module docstring)."""
    from megatron.bridge.models import gpt_provider

    if spec in (gpt_provider.default_layer_spec, gpt_provider.transformer_engine_layer_spec):
        return local_layer_spec
    if isinstance(spec, functools.partial) and "use_transformer_engine" in spec.keywords:
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "use_transformer_engine": False})
    fn = spec.func if isinstance(spec, functools.partial) else spec
    name = getattr(fn, "__name__", repr(fn))
    where = inspect.getsourcefile(fn) if inspect.isfunction(fn) else None
    place = f"{upstream_path(where) or where}:{inspect.getsourcelines(fn)[1]}" if where else repr(spec)
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
    except Exception as exc:
        # Its TE base spec cannot be built without TE: the frame that raised uses a TE-only name that
        # is None (megatron-core's TESpecProvider, gpt_layer_specs.py:54) or undefined without TE.
        # Any other exception of a spec builder is an error, whatever its type.
        absent = te_names_absent(exc)
        if not absent:
            raise
        raise Unsupported(
            f"needs transformer_engine: the bridge's layer spec {name} ({place}) builds on the TE spec and "
            f"fails without it ({', '.join(absent)} is None without TE): {describe(exc)}"
        ) from exc
    te = sorted(te_classes(built))
    if te:
        raise Unsupported(f"needs transformer_engine: the bridge's layer spec {name} ({place}) uses {', '.join(te)}")
    return spec


def te_names_absent(exc: BaseException) -> list[str]:
    """TE-only names (``TE*``) the raising frame uses that are None or undefined, when TE is not installed."""
    import importlib.util

    if exc.__traceback__ is None or importlib.util.find_spec("transformer_engine") is not None:
        return []
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    scope = {**frame.f_globals, **frame.f_locals}
    return sorted(n for n in frame.f_code.co_names if n.startswith("TE") and scope.get(n) is None)


def te_classes(spec: Any, seen: set[int] | None = None) -> set[str]:
    """Names of Transformer Engine classes anywhere in a (block or layer) ModuleSpec tree."""
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
    if isinstance(spec, list | tuple):
        for item in spec:
            out |= te_classes(item, seen)
        return out
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        for f in dataclasses.fields(spec):
            out |= te_classes(getattr(spec, f.name), seen)
        return out
    for attr in ("module", "submodules", "layer_specs"):
        if hasattr(spec, attr):
            out |= te_classes(getattr(spec, attr), seen)
    return out
