"""Matrix files: products of families x layouts x adapters x specs x dtypes x syncs, declared in TOML.

```toml
timeout = 300                     # seconds per cell launch (optional)
exporter = "mypkg.ckpt:export"    # optional: your exporter, saver, loader (compat.declare.plugins)
families_file = "families.toml"   # optional: your own declarations, relative to this file
adapters_file = "adapters.toml"
[[cells]]
families = ["llama", "qwen2"]
layouts = ["tp1", "tp=2", "pp=2"]
load_layouts = ["tp1"]           # optional: save at each layout, load at each other one
adapters = ["lora"]              # optional
specs = ["local"]                # optional: "local" and/or "te"
dtypes = ["fp32"]                # optional
serve = ["vllm"]                 # optional: serving engines that load each export too (compat.serving)
sync = ["file", "memory"]        # optional: how the adapter reaches them (default file; compat.rank.memory_sync)
```
Every cell is validated on load (unknown names, layouts a family cannot take, duplicate ids)
so a bad matrix is refused before anything runs.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compat.declare.adapters import add_adapters
from compat.declare.cells import DEFAULT_ADAPTER, DEFAULT_DTYPE, DEFAULT_SPEC, DEFAULT_SYNC, Cell
from compat.declare.families import add_families
from compat.declare.layouts import Layout
from compat.declare.plugins import ROLES, PluginError, Plugins
from compat.declare.suggest import key_hints

__all__ = ["Matrix", "MatrixError", "load_matrix", "parse_matrix"]

_TOP_KEYS = {"timeout", "cells", "about", "families_file", "adapters_file", *ROLES}
_BLOCK_KEYS = {"families", "layouts", "load_layouts", "adapters", "specs", "dtypes", "serve", "sync"}


class MatrixError(ValueError):
    """A malformed matrix file, or one that names cells that cannot exist."""


@dataclass(frozen=True)
class Matrix:
    name: str
    cells: tuple[Cell, ...]
    timeout: float | None = None
    plugins: Plugins = field(default_factory=Plugins)


def _strings(block: dict[str, Any], key: str, where: str, default: list[str] | None) -> list[str]:
    value = block.get(key, default)
    if value is None:
        raise MatrixError(f"{where}: missing {key!r}")
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise MatrixError(f"{where}: {key!r} must be a non-empty list of strings")
    return value


def parse_matrix(data: dict[str, Any], name: str, base: Path | None = None) -> Matrix:
    """Validate a matrix's data; ``base`` is the directory its ``*_file`` keys are relative to."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        hints = key_hints(unknown, _TOP_KEYS)
        raise MatrixError(f"{name}: unknown top-level keys {sorted(unknown)}{hints}; allowed: {sorted(_TOP_KEYS)}")
    for key, add in (("families_file", add_families), ("adapters_file", add_adapters)):
        if key in data:
            if not isinstance(data[key], str):
                raise MatrixError(f"{name}: {key} must be a path (a string)")
            try:
                add((base or Path.cwd()) / data[key])
            except ValueError as exc:
                raise MatrixError(f"{name}: {key}: {exc}") from None
    try:
        plugins = Plugins(**{role: data[role] for role in ROLES if role in data})
    except (PluginError, TypeError) as exc:
        raise MatrixError(f"{name}: {exc}") from None
    blocks = data.get("cells")
    if not isinstance(blocks, list) or not blocks:
        raise MatrixError(f"{name}: no [[cells]] blocks")
    timeout = data.get("timeout")
    if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
        raise MatrixError(f"{name}: timeout must be a positive number of seconds")
    cells: dict[str, Cell] = {}
    for i, block in enumerate(blocks):
        where = f"{name} [[cells]] #{i + 1}"
        unknown = set(block) - _BLOCK_KEYS
        if unknown:
            hints = key_hints(unknown, _BLOCK_KEYS)
            raise MatrixError(f"{where}: unknown keys {sorted(unknown)}{hints}; allowed: {sorted(_BLOCK_KEYS)}")
        try:
            families = _strings(block, "families", where, None)
            layouts = [Layout.parse(s) for s in _strings(block, "layouts", where, None)]
            loads = block.get("load_layouts")
            load_layouts = [Layout.parse(s) for s in _strings(block, "load_layouts", where, [])] if loads else [None]
            adapters = _strings(block, "adapters", where, [DEFAULT_ADAPTER])
            specs = _strings(block, "specs", where, [DEFAULT_SPEC])
            dtypes = _strings(block, "dtypes", where, [DEFAULT_DTYPE])
            serve = tuple(_strings(block, "serve", where, [])) if "serve" in block else ()
            syncs = _strings(block, "sync", where, [DEFAULT_SYNC])
            product = itertools.product(families, layouts, load_layouts, adapters, specs, dtypes, syncs)
            for fam, lay, load, ad, spec, dt, sync in product:
                if load == lay:
                    continue  # the diagonal of a resharding product is the plain cell
                cell = Cell.make(fam, lay, load, ad, dt, spec, serve, sync)
                if cell.id in cells:
                    raise MatrixError(f"cell {cell.id} is listed twice")
                cells[cell.id] = cell
        except MatrixError:
            raise
        except ValueError as exc:
            raise MatrixError(f"{where}: {exc}") from None
    return Matrix(name=name, cells=tuple(cells.values()), timeout=timeout, plugins=plugins)


def load_matrix(path: Path) -> Matrix:
    """Read and validate a matrix file."""
    if not path.is_file():
        raise MatrixError(f"matrix file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{path}: not valid TOML: {exc}") from None
    return parse_matrix(data, str(path), path.parent)
