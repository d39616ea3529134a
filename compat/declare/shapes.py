"""Shapes to search: per-family config ranges (``compat/data/shapes.toml``), validated, and the
Hypothesis strategy that draws cells from them.

A drawn shape is a family of its own (``llama-kv1-hd16``: the base family with the keys it changes),
declared in a families file that grows as the search draws (:class:`DrawnFamilies`), so it reaches
the ranks the way a user's ``--families`` file does and the warm rank groups keep serving. Layouts
and adapter kinds are drawn only among those :func:`compat.declare.cells.Cell.make` accepts for the drawn
shape (``check_fits``, adapter rank against TP): an impossible cell is never generated.
"""

from __future__ import annotations

import json
import threading
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from compat.declare.cells import Cell, CellError
from compat.declare.families import _EXPERT_KEYS, Family, FamilyError, add_families, families, get_family
from compat.declare.layouts import Layout, LayoutError

__all__ = ["Drawn", "DrawnFamilies", "ShapeError", "Space", "cells", "family_snippet", "load_spaces"]


class ShapeError(ValueError):
    """A malformed shapes declaration."""


@dataclass(frozen=True)
class Space:
    """What may vary in one family: key -> candidate values, the family's own value first."""

    family: str
    keys: tuple[tuple[str, tuple[int, ...]], ...]
    names: dict[str, str]
    divides: tuple[tuple[str, str], ...]
    at_most: tuple[tuple[str, str], ...]

    def allowed(self, key: str, value: int, drawn: dict[str, int]) -> bool:
        """``value`` for ``key`` breaks no rule against the keys drawn so far (or the family's fixed ones)."""
        config = {**get_family(self.family).config, **drawn, key: value}
        for a, b in self.divides:
            if key in (a, b) and a in config and b in config and config[b] % config[a]:
                return False
        for a, b in self.at_most:
            if key in (a, b) and a in config and b in config and config[a] > config[b]:
                return False
        return True

    def name(self, overrides: dict[str, int]) -> str:
        """The drawn family's name: the base name, then each changed key's short name and value."""
        return "-".join([self.family, *(f"{self.names[k]}{overrides[k]}" for k, _ in self.keys if k in overrides)])


def _resource() -> tuple[dict[str, Any], str]:
    return tomllib.loads(resources.files("compat.data").joinpath("shapes.toml").read_text()), "compat/data/shapes.toml"


def load_spaces(data: dict[str, Any] | None = None, source: str = "") -> tuple[dict[str, Space], tuple[str, ...]]:
    """Every family's space and the layout order, validated against the declared families."""
    if data is None:
        data, source = _resource()
    unknown = set(data) - {"names", "rules", "layouts", "family"}
    if unknown:
        raise ShapeError(f"{source}: unknown top-level keys {sorted(unknown)}")
    names = data.get("names", {})
    rules = data.get("rules", {})
    pairs = {kind: tuple(tuple(p) for p in rules.get(kind, [])) for kind in ("divides", "at_most")}
    for kind, listed in pairs.items():
        if not all(len(p) == 2 and all(isinstance(k, str) for k in p) for p in listed):
            raise ShapeError(f"{source}: rules.{kind} must be a list of [key, key] pairs")
    order = tuple(data.get("layouts", {}).get("order", ["tp1"]))
    for text in order:
        Layout.parse(text)  # LayoutError names the bad one
    spaces = {}
    for family, keys in data.get("family", {}).items():
        try:
            config = get_family(family).config
        except FamilyError as exc:
            raise ShapeError(f"{source}: [family.{family}]: {exc}") from None
        declared = []
        for key, values in keys.items():
            where = f"{source}: [family.{family}] {key}"
            if key not in config:
                raise ShapeError(f"{where}: not a key of the family's config (compat/data/families.toml)")
            if key not in names:
                raise ShapeError(f"{where}: has no short name in [names]")
            if not (isinstance(values, list) and values and all(type(v) is int and v > 0 for v in values)):
                raise ShapeError(f"{where}: must be a non-empty list of positive integers, got {values!r}")
            own = config[key]
            declared.append((key, (own, *(v for v in dict.fromkeys(values) if v != own))))
        spaces[family] = Space(family, tuple(declared), names, pairs["divides"], pairs["at_most"])
    return spaces, order


@dataclass(frozen=True)
class Drawn:
    """One drawn cell: its base family, the config keys it changes, and the cell itself."""

    base: str
    overrides: dict[str, int]
    cell: Cell  # of the drawn family

    @property
    def base_id(self) -> str:
        """The same cell at the base family's shape (whose expectations apply where none names this shape)."""
        return self.base + self.cell.id[len(self.cell.family) :]


_DECLARING = threading.Lock()


class DrawnFamilies:
    """A families file the search appends each new drawn shape to, declared as it grows.

    Only appended to, never rewritten: a warm rank that read it before sees the same families and,
    re-reading it on its next task (``compat.declare.declarations``), the new ones.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# shapes drawn by python -m compat fuzz (compat/declare/shapes.py)\n")

    def declare(self, space: Space, overrides: dict[str, int]) -> str:
        name = space.name(overrides)
        with _DECLARING:  # one lock for every search of this process: a name is declared once, in one file
            # Declared already (by another search in this process: the name says the whole shape): reuse it.
            if overrides and name not in families():
                with self.path.open("a") as out:
                    out.write("\n" + family_snippet(get_family(space.family), name, overrides))
                add_families(self.path)
        return name


def family_snippet(base: Family, name: str, overrides: dict[str, int]) -> str:
    """A ``[family.NAME]`` table (families.toml's schema): the base family with ``overrides``."""
    config = {**base.config, **overrides}
    experts = next((config[k] for k in _EXPERT_KEYS if k in config), 0) if base.num_experts else 0
    lines = [
        f"[family.{name}]",
        f"model_type = {json.dumps(base.model_type)}",
        f"architecture = {json.dumps(base.architecture)}",
        f"about = {json.dumps(f'{base.name} with ' + ', '.join(f'{k} = {v}' for k, v in overrides.items()))}",
    ]
    if experts:
        lines.append(f"num_experts = {experts}")
    if base.hf_modules:
        lines.append(f"hf_modules = {_toml({k: list(v) for k, v in base.hf_modules.items()})}")
    lines.append(f"config = {_toml(config)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """An inline TOML value (the types a family's config holds: tables, lists, strings, numbers, booleans)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def cells(
    spaces: dict[str, Space],
    layouts: tuple[str, ...],
    drawn_families: DrawnFamilies,
    adapters: tuple[str, ...],
    dtypes: tuple[str, ...],
    spec: str,
    max_world: int,
) -> Any:
    """A strategy of :class:`Drawn` cells; each draw shrinks toward the first candidate (the declared shape,
    ``tp1``, the first adapter and dtype, no resharding)."""
    from hypothesis import reject
    from hypothesis import strategies as st

    parsed = [Layout.parse(t) for t in layouts]

    @st.composite
    def draw_cell(draw: Any) -> Drawn:
        space = spaces[draw(st.sampled_from(sorted(spaces)))]
        overrides: dict[str, int] = {}
        own = get_family(space.family).config
        for key, values in space.keys:
            candidates = [v for v in values if space.allowed(key, v, overrides)]
            if not candidates:  # the keys drawn before leave this one no value: not a shape at all
                reject()
            value = draw(st.sampled_from(candidates))
            if value != own[key]:
                overrides[key] = value
        name = drawn_families.declare(space, overrides)

        def make(layout: Layout, load: Layout | None = None, adapter: str = adapters[0]) -> Cell | None:
            if max(layout.world_size, (load or layout).world_size) > max_world:
                return None
            try:
                return Cell.make(name, layout, load, adapter, dtypes[0], spec)
            except (CellError, LayoutError):
                return None

        fitting = [lay for lay in parsed if make(lay)]
        layout = draw(st.sampled_from(fitting))
        load = draw(st.sampled_from([layout, *(lay for lay in fitting if lay != layout and make(layout, lay))]))
        adapter = draw(st.sampled_from([a for a in adapters if make(layout, load, a)]))
        dtype = draw(st.sampled_from(dtypes))
        return Drawn(space.family, overrides, Cell.make(name, layout, load, adapter, dtype, spec))

    return draw_cell()
