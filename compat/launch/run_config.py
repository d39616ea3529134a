"""A run's configuration, from the command line and the matrix file, validated before anything starts.

Every reason a run cannot start is a :class:`BadInput` with one sentence: malformed or unknown
declarations, cells that cannot exist, a selection that selects nothing, a stack that is missing
or too old, a plugin that does not import. Nothing is launched and nothing is written before.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from compat.declare.cells import Cell, selects
from compat.declare.expected import Expectations, Expected, load_expectations
from compat.declare.plugins import ROLES, Plugins, check

__all__ = ["BadInput", "RunConfig", "configure"]


class BadInput(Exception):
    """Refused before any process starts."""


@dataclass
class RunConfig:
    cells: list[Cell]
    expectations: Expectations
    backend: str
    timeout: float
    plugins: Plugins
    versions: dict[str, str | None]
    device: str

    def expected(self, cell: Cell) -> Expected:
        return self.expectations.for_cell(cell.id, self.versions, cell.spec)

    def versions_line(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.versions.items())


def configure(args: argparse.Namespace) -> RunConfig:
    """The run ``python -m compat run``/``bench`` asks for; :class:`BadInput` if it cannot start."""
    from compat.declare.versions import check_stack, installed_versions
    from compat.launch import launcher as launch
    from compat.rank import backends
    from compat.results.record import device_name

    try:
        _declarations(args)
        cells, matrix_timeout, matrix_plugins = _cells(args)
        expectations = _expectations(args)
        check_stack()
        backend = backends.resolve(args.backend)
        plugins = Plugins(**{**matrix_plugins.named(), **{r: getattr(args, r) for r in ROLES if getattr(args, r)}})
        check(plugins, backend)
        _servable(cells, backend)
        _scale_on_gpu(cells, backend)
    except BadInput:
        raise
    except ValueError as exc:  # every declaration, layout, cell, matrix, plugin and stack error
        raise BadInput(str(exc)) from None
    timeout = args.timeout or matrix_timeout or launch.DEFAULT_TIMEOUT
    return RunConfig(cells, expectations, backend, timeout, plugins, installed_versions(), device_name(backend))


def _scale_on_gpu(cells: list[Cell], backend: str) -> None:
    """Scale families (real widths, ``scale = true``) build multi-GB models: not on a CPU runner."""
    from compat.declare.families import get_family

    scale = sorted({c.family for c in cells if get_family(c.family).scale})
    if scale and backend == "cpu":
        raise BadInput(
            f"{', '.join(scale)} {'is a scale family' if len(scale) == 1 else 'are scale families'} "
            "(real widths, compat/data/families.toml): run them on a GPU (--backend cuda, matrix/scale.toml), "
            "or pick a toy family"
        )


def _declarations(args: argparse.Namespace) -> None:
    from compat.declare.adapters import add_adapters
    from compat.declare.families import add_families

    if args.families_file:
        add_families(args.families_file)
    if args.adapters_file:
        add_adapters(args.adapters_file)


def _cells(args: argparse.Namespace) -> tuple[list[Cell], float | None, Plugins]:
    from compat.declare.layouts import Layout
    from compat.declare.matrix import load_matrix

    if args.matrix and (args.family or args.layout):
        raise BadInput("give either --matrix or --family/--layout, not both")
    if args.matrix:
        matrix = load_matrix(args.matrix)
        cells, timeout, plugins = list(matrix.cells), matrix.timeout, matrix.plugins
    elif args.family and args.layout:
        load = Layout.parse(args.load_layout) if args.load_layout else None
        serve = tuple(args.serve or ())
        cell = Cell.make(
            args.family, Layout.parse(args.layout), load, args.adapter, args.dtype, args.spec, serve, args.sync
        )
        cells, timeout, plugins = [cell], None, Plugins()
    else:
        raise BadInput("give --matrix FILE, or --family F --layout L for one cell")
    if args.select:
        chosen = [c for c in cells if selects(args.select, c.id)]
        if not chosen:
            raise BadInput(f"-k {args.select!r} selects no cell of {len(cells)}{_near(args.select, cells)}")
        cells = chosen
    if args.shard:
        k, sep, n = args.shard.partition("/")
        if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
            raise BadInput(f"--shard {args.shard!r}: expected K/N with 1 <= K <= N, e.g. 1/2")
        cells = cells[int(k) - 1 :: int(n)]
    return cells, timeout, plugins


def _near(select: str, cells: list[Cell]) -> str:
    """``; did you mean 'llama.tp2'?``: the cell ids (or their families) closest to each part of ``-k``."""
    from compat.declare.suggest import did_you_mean

    names = {c.id for c in cells} | {c.family for c in cells}
    hints = [hint for part in select.split("|") if (hint := did_you_mean(part, names))]
    return f"; {' '.join(hints)}" if hints else ""


def _servable(cells: list[Cell], backend: str) -> None:
    """Each served cell's engine has pins for this device and takes its dtype and sizes."""
    from compat.declare.pin_sets import GateError
    from compat.serving import check_servable

    for cell in cells:
        try:
            check_servable(cell, backend)
        except GateError as exc:
            raise BadInput(str(exc)) from None


def _expectations(args: argparse.Namespace) -> Expectations:
    if args.expected is not None:
        if not args.expected.is_file():
            raise BadInput(f"expected-outcomes file {args.expected} does not exist")
        return load_expectations(args.expected)
    default = (args.matrix.parent if args.matrix else Path("matrix")) / "expected.toml"
    return load_expectations(default if default.is_file() else None)
