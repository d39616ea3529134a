"""Parallel layouts: what a cell shards over, written ``tp=2,pp=2`` or as cell ids spell it (``tp2-pp2``).

A layout knows its own world size; whether a *family* can take it is checked by
:func:`check_fits`, before any process starts, so impossible cells are refused with the
constraint they break instead of crashing inside Megatron.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from compat.declare.suggest import did_you_mean

if TYPE_CHECKING:
    from compat.declare.families import Family

__all__ = ["Layout", "LayoutError", "check_fits"]

_KEYS = ("tp", "sp", "pp", "dp", "ep", "etp", "vpp")
_FLAGS = ("sp",)  # on/off keys: ``sp=1`` in the CLI form, ``sp`` in the id form


class LayoutError(ValueError):
    """A layout that is malformed, or that a family cannot be sharded into."""


@dataclass(frozen=True, order=True)
class Layout:
    """Tensor, pipeline, data, expert, expert-tensor and virtual-pipeline sizes (1 where not given) and
    sequence parallelism (``sp``, 0 or 1).

    ``dp`` is the dense data-parallel size. Not given, it is the least that holds whole EP x ETP
    groups, as Megatron folds them into data x tensor parallelism (``dp x tp = ep x etp x edp``); it
    is stored resolved, so ``ep=2`` and ``ep=2,dp=2`` are one layout, and named in the id only above
    that least size.
    """

    tp: int = 1
    sp: int = 0
    pp: int = 1
    dp: int = None  # type: ignore[assignment]  # resolved in __post_init__
    ep: int = 1
    etp: int = 1
    vpp: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dp" and value is None:
                continue
            allowed = value in (0, 1) if f.name in _FLAGS else isinstance(value, int) and value >= 1
            if not isinstance(value, int) or isinstance(value, bool) or not allowed:
                kind = "0 or 1" if f.name in _FLAGS else "a positive integer"
                raise LayoutError(f"layout key {f.name!r} must be {kind}, got {value!r}")
        if self.vpp > 1 and self.pp == 1:
            raise LayoutError(f"vpp={self.vpp} needs pp > 1: virtual stages interleave pipeline stages")
        if self.sp and self.tp == 1:
            raise LayoutError("sp=1 needs tp > 1: sequence parallelism shards the sequence over the TP group")
        if self.dp is None:
            object.__setattr__(self, "dp", self.least_dp)
        experts = self.ep * self.etp
        if (self.dp * self.tp) % experts:
            raise LayoutError(
                f"dp={self.dp} x tp={self.tp} = {self.dp * self.tp} is not a multiple of ep={self.ep} x "
                f"etp={self.etp} = {experts}: Megatron folds expert parallelism into data x tensor "
                "parallelism (dp x tp = ep x etp x edp)"
            )

    @property
    def least_dp(self) -> int:
        """The dense data-parallel size that EP x ETP alone implies: lcm(tp, ep x etp) / tp."""
        return math.lcm(self.tp, self.ep * self.etp) // self.tp

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Read ``tp=2,ep=2`` (the command-line form) or ``tp2-ep2`` (the form cell ids use; ``tp2-sp-dp2``,
        ``pp2-vpp2``); ``tp1`` is one process. A part may take either form: ``tp=2,sp`` is ``tp2-sp``."""
        original = text
        text = text.strip().lower()
        if text in ("", "tp1", "1"):
            return cls()
        parts = text.split(",") if "=" in text else re.split(r"[,-]", text)
        values: dict[str, int] = {}
        for part in (p.strip() for p in parts):
            key, raw = _read_part(part, original)
            if key in values:
                raise LayoutError(f"layout {original!r} gives {key!r} twice")
            try:
                values[key] = int(raw)
            except ValueError:
                raise LayoutError(f"layout {original!r}: {key}={raw!r} is not an integer") from None
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
        """pp x dp x tp: every stage holds dp whole TP groups (and so whole EP x ETP groups)."""
        return self.pp * self.dp * self.tp

    @property
    def slug(self) -> str:
        """The id fragment: keys off their default joined by '-', e.g. ``tp2-sp-dp2``; ``tp1`` if none."""
        given = self.as_dict()
        shown = [k for k in _KEYS if k in given and (k in _FLAGS or given[k] != 1)]
        parts = [k if k in _FLAGS else f"{k}{given[k]}" for k in shown]
        return "-".join(parts) or "tp1"

    def as_dict(self) -> dict[str, int]:
        """Every size key; ``dp`` and ``sp`` only where off their default, so older results read alike."""
        out = {k: getattr(self, k) for k in _KEYS if k not in ("dp", *_FLAGS)}
        if self.sp:
            out["sp"] = self.sp
        if self.dp != self.least_dp:
            out["dp"] = self.dp
        return {k: out[k] for k in _KEYS if k in out}

    def __str__(self) -> str:
        return self.slug


def _read_part(part: str, original: str) -> tuple[str, str]:
    """One part of a layout: ``tp=2``, ``tp2``, or a flag alone (``sp``); the key and its raw value."""
    key, sep, raw = part.partition("=")
    if not sep:
        match = re.fullmatch(r"([a-z]+?)(\d+)", part)
        key, raw = (match.group(1), match.group(2)) if match else (part, "1" if part in _FLAGS else "")
    key, raw = key.strip(), raw.strip()
    if key not in _KEYS or not raw:
        what = f"{key!r} has no size" if key in _KEYS else f"{key!r} is not a layout key"
        hint = "" if key in _KEYS else did_you_mean(key, _KEYS, cutoff=0.5)
        raise LayoutError(
            f"cannot read layout {original!r}: {what}{f' ({hint})' if hint else ''}; write key=value pairs of "
            f"{', '.join(_KEYS)} ('tp=2,ep=2'), or the form cell ids use ('tp2-ep2', 'tp2-sp-ep2', 'pp2-dp2'; "
            "'tp1' is one process)"
        )
    return key, raw


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
