"""Parallel layouts: what a cell shards over, written as docs/contract.md spells it (``tp=2,pp=2``).

A layout knows its own world size; whether a *family* can take it is checked by
:func:`check_fits`, before any process starts, so impossible cells are refused with the
constraint they break instead of crashing inside Megatron.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compat.families import Family

__all__ = ["Layout", "LayoutError", "check_fits"]

_KEYS = ("tp", "pp", "ep", "etp", "vpp")


class LayoutError(ValueError):
    """A layout that is malformed, or that a family cannot be sharded into."""


@dataclass(frozen=True, order=True)
class Layout:
    """Tensor, pipeline, expert, expert-tensor and virtual-pipeline sizes; 1 where not given."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LayoutError(f"layout key {f.name!r} must be a positive integer, got {value!r}")
        if self.vpp > 1 and self.pp == 1:
            raise LayoutError(f"vpp={self.vpp} needs pp > 1: virtual stages interleave pipeline stages")

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Parse ``tp=2,pp=2`` (CLI form) or ``tp2-pp2`` (id form); ``tp1`` is one process."""
        text = text.strip()
        if text in ("", "tp1", "1"):
            return cls()
        if "=" not in text:  # the id form, e.g. tp2-pp2
            text = ",".join(re.sub(r"^([a-z]+?)(\d+)$", r"\1=\2", part) for part in text.split("-"))
        values: dict[str, int] = {}
        for part in text.split(","):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS:
                raise LayoutError(
                    f"cannot read layout {text!r}: expected comma-separated key=value pairs "
                    f"with keys from {', '.join(_KEYS)} (e.g. 'tp=2,pp=2')"
                )
            if key in values:
                raise LayoutError(f"layout {text!r} gives {key!r} twice")
            try:
                values[key] = int(raw)
            except ValueError:
                raise LayoutError(f"layout {text!r}: {key}={raw!r} is not an integer") from None
        return cls(**values)

    @classmethod
    def from_mapping(cls, data: dict[str, object]) -> Layout:
        """Build from a TOML/JSON table; unknown keys are an error, not silently dropped."""
        unknown = set(data) - set(_KEYS)
        if unknown:
            raise LayoutError(f"unknown layout keys {sorted(unknown)}; known: {', '.join(_KEYS)}")
        return cls(**data)  # type: ignore[arg-type]

    @property
    def world_size(self) -> int:
        """pp x lcm(tp, ep x etp): data parallelism fills the difference (tp*dp = ep*etp*edp)."""
        return self.pp * math.lcm(self.tp, self.ep * self.etp)

    @property
    def slug(self) -> str:
        """The id fragment: non-default keys joined by '-', e.g. ``tp2-ep2``; ``tp1`` if none."""
        parts = [f"{k}{getattr(self, k)}" for k in _KEYS if getattr(self, k) != 1]
        return "-".join(parts) or "tp1"

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in _KEYS}

    def __str__(self) -> str:
        return self.slug


def check_fits(layout: Layout, family: Family) -> None:
    """Refuse a layout the family's tiny model cannot be sharded into, naming the constraint."""
    cfg = family.dims
    problems = []
    if cfg.num_attention_heads % layout.tp:
        problems.append(f"tp={layout.tp} does not divide {cfg.num_attention_heads} attention heads")
    if cfg.num_key_value_heads % layout.tp:
        problems.append(f"tp={layout.tp} does not divide {cfg.num_key_value_heads} KV heads")
    stages = layout.pp * layout.vpp
    if cfg.num_layers % stages:
        what = f"pp={layout.pp}" + (f" x vpp={layout.vpp}" if layout.vpp > 1 else "")
        problems.append(f"{what} = {stages} stages do not divide {cfg.num_layers} layers")
    if layout.ep > 1 or layout.etp > 1:
        if not family.num_experts:
            problems.append(f"ep={layout.ep}, etp={layout.etp}: family {family.name!r} has no experts")
        elif family.num_experts % layout.ep:
            problems.append(f"ep={layout.ep} does not divide {family.num_experts} experts")
    if problems:
        raise LayoutError(f"layout {layout.slug} cannot shard {family.name}: " + "; ".join(problems))
