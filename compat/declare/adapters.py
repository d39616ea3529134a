"""Adapter kinds: how a cell's adapter is configured in the bridge, declared as data.

``compat/data/adapters.toml`` names each kind; a cell picks one by name. Building the bridge's
PEFT object happens in a worker (it imports megatron.bridge); reading the declarations does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compat.declare.declarations import Declarations
from compat.declare.specs import SPECS

__all__ = ["Adapter", "AdapterError", "adapters", "add_adapters", "get_adapter"]

_PEFT_CLASSES = {
    "lora": ("megatron.bridge.peft.lora", "LoRA"),
    "canonical_lora": ("megatron.bridge.peft.canonical_lora", "CanonicalLoRA"),
    "dora": ("megatron.bridge.peft.dora", "DoRA"),
}
_KEYS = {"peft", "targets", "rank", "alpha", "dropout", "about", "options", "hf_scope", "specs", "moe_only"}


class AdapterError(ValueError):
    """An unknown adapter kind, or a malformed declaration."""


@dataclass(frozen=True)
class Adapter:
    name: str
    peft: str
    targets: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float = 0.0
    about: str = ""
    options: tuple[tuple[str, Any], ...] = ()
    hf_scope: str = ""  # regex: the HF modules the targets reach (wildcard targets), "" for all
    specs: tuple[str, ...] = ()  # the layer specs this kind exists for; () for every spec
    moe_only: bool = False  # configures routed experts: refused for dense families

    def peft_class(self) -> Any:
        """The installed bridge's PEFT class for this kind (imports megatron.bridge: call in a worker)."""
        from importlib import import_module

        module, cls = _PEFT_CLASSES[self.peft]
        return getattr(import_module(module), cls)

    def unavailable_options(self) -> list[str]:
        """Options of this kind that the installed bridge's PEFT class does not take (older releases)."""
        import inspect

        accepted = inspect.signature(self.peft_class()).parameters
        return [name for name, _ in self.options if name not in accepted]

    def build(self) -> Any:
        """The bridge's PEFT object for this kind (imports megatron.bridge: call in a worker)."""
        return self.peft_class()(
            target_modules=list(self.targets),
            dim=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            **dict(self.options),
        )


def _parse(data: dict[str, Any], source: str, known: dict[str, Adapter] | None = None) -> dict[str, Adapter]:
    """The file's adapter kinds (``known``, the earlier declarations, is not needed: a kind names no other)."""
    unknown_top = set(data) - {"defaults", "adapter"}
    if unknown_top:
        raise AdapterError(
            f"{source}: unknown top-level keys {sorted(unknown_top)}; write [defaults] and [adapter.NAME] tables"
        )
    out = {}
    for name, spec in data.get("adapter", {}).items():
        unknown = set(spec) - _KEYS
        if unknown:
            raise AdapterError(f"{source}: adapter {name!r} has unknown keys {sorted(unknown)}")
        if spec.get("peft") not in _PEFT_CLASSES:
            raise AdapterError(f"{source}: adapter {name!r}: peft must be one of {sorted(_PEFT_CLASSES)}")
        targets = spec.get("targets")
        if not targets or not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"{source}: adapter {name!r} needs a non-empty list of targets")
        rank = spec.get("rank")
        if not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"{source}: adapter {name!r} needs a positive integer rank")
        specs = spec.get("specs", [])
        if not isinstance(specs, list) or not set(specs) <= set(SPECS):
            raise AdapterError(f"{source}: adapter {name!r}: specs must be a list of {', '.join(SPECS)}")
        out[name] = Adapter(
            name=name,
            peft=spec["peft"],
            targets=tuple(targets),
            rank=rank,
            alpha=spec.get("alpha", 2 * rank),
            dropout=spec.get("dropout", 0.0),
            about=spec.get("about", ""),
            options=tuple(sorted(spec.get("options", {}).items())),
            hf_scope=spec.get("hf_scope", ""),
            specs=tuple(specs),
            moe_only=bool(spec.get("moe_only", False)),
        )
    if not out:
        raise AdapterError(f"{source}: no [adapter.NAME] tables")
    return out


_DECLARED = Declarations("adapter", "adapters", "adapters.toml", _parse, AdapterError)


def adapters() -> dict[str, Adapter]:
    """Every declared adapter kind (built-in, then the user's files), by name."""
    return _DECLARED.all()


def get_adapter(name: str) -> Adapter:
    return _DECLARED.get(name)


def add_adapters(path: Path) -> None:
    """Add a user's adapter declarations (same schema as ``compat/data/adapters.toml``)."""
    _DECLARED.add_file(path)
