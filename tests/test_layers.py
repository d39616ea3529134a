"""The architecture as a check: compat's import graph, read with ``ast``, has no cycle and runs downward.

``LAYERS`` is the order, lowest first: a module may import its own layer and the ones below, never
one above. A layer names modules and packages of ``compat`` (a package covers every module in
it); a module no layer names fails the check, so a new module is placed on purpose. Every import
counts, a function's deferred one too; a ``TYPE_CHECKING`` block's counts for cycles (two modules that
need each other's names are one concept split in two, whether or not the import runs), not for the
layers (an annotation may name a type from above).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "compat"

# Lowest first. checks: what a finding is and how tensors and files are judged; declare: what a
# cell is; rank: what a rank process runs; results: a cell's record; launch: starting ranks;
# report: what people read; commands: the entry points.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (name, tuple(members.split()))
    for name, members in (
        ("checks", "checks"),
        ("declare", "data declare"),
        ("rank", "rank serving"),
        ("results", "results"),
        ("launch", "launch"),
        ("report", "report"),
        ("commands", "__main__ cli pytest_plugin commands"),
    )
)
# The package itself (``compat/__init__.py``: the public names, loaded lazily) sits on top.
ROOT_LAYER = len(LAYERS) - 1

# What loading the pytest plugin may import of compat (packages above them aside): stdlib-only modules.
PLUGIN_LOADS = {"compat.pytest_plugin", "compat.launch.forkserver", "compat.rank.liveness"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[ast.AST]:
    skip: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(n for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph(root: Path = ROOT, type_checking: bool = False) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (``from pkg import mod`` names the module);
    ``type_checking``: those imported for annotations alone too."""
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skip = set() if type_checking else _type_checking_only(tree)
        found: set[str] = set()
        for node in ast.walk(tree):
            if node in skip:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names)
        graph[name] = {m for m in found if m in mods and m != name}
    return graph


def layer_of(module: str, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> int | None:
    """The index of the layer whose longest entry is ``module`` or a package above it."""
    rel = module.removeprefix("compat").removeprefix(".")
    if not rel:
        return ROOT_LAYER
    best: tuple[int, int] | None = None
    for index, (_, members) in enumerate(layers):
        for member in members:
            if rel == member or rel.startswith(member + "."):
                if best is None or len(member) > best[1]:
                    best = (index, len(member))
    return best[0] if best else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle once, as the path that closes it (depth-first, modules in sorted order)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def upward(graph: dict[str, set[str]], layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> list[str]:
    """Every import from a lower layer to a higher one, as ``a (layer) -> b (layer)``."""
    names = [name for name, _ in layers]
    out = []
    for a, targets in sorted(graph.items()):
        la = layer_of(a, layers)
        for b in sorted(targets):
            lb = layer_of(b, layers)
            if la is not None and lb is not None and lb > la:
                out.append(f"{a} ({names[la]}) -> {b} ({names[lb]})")
    return out


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in modules() if layer_of(m) is None)
    assert not missing, f"modules no layer names (place them in tests/test_layers.py LAYERS): {missing}"


def test_no_import_cycle() -> None:
    found = cycles(import_graph(type_checking=True))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_imports_run_downward() -> None:
    found = upward(import_graph())
    assert not found, "imports from a lower layer to a higher one:\n" + "\n".join(found)


def test_the_checks_catch_a_cycle_and_an_upward_import() -> None:
    """The planted faults of this check: a two-module cycle, and a declaration importing a rank module."""
    graph = {
        "compat.declare.cells": {"compat.rank.worker"},
        "compat.rank.worker": {"compat.declare.cells"},
        "compat.checks.findings": set(),
    }
    assert cycles(graph) == [["compat.declare.cells", "compat.rank.worker", "compat.declare.cells"]]
    assert upward(graph) == [f"compat.declare.cells ({LAYERS[1][0]}) -> compat.rank.worker ({LAYERS[2][0]})"]
    assert upward({"compat.rank.worker": {"compat.declare.cells"}}) == []


def test_a_cycle_through_type_checking_imports_is_caught(tmp_path: Path) -> None:
    """Before: gate.py and gate_compare.py imported each other, one side under TYPE_CHECKING, and passed."""
    (tmp_path / "compat" / "commands").mkdir(parents=True)
    for path in ("__init__.py", "commands/__init__.py"):
        (tmp_path / "compat" / path).write_text("")
    (tmp_path / "compat" / "commands" / "gate.py").write_text("from compat.commands.gate_compare import x\n")
    (tmp_path / "compat" / "commands" / "gate_compare.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from compat.commands.gate import PinSet\n"
    )
    loop = ["compat.commands.gate", "compat.commands.gate_compare", "compat.commands.gate"]
    assert cycles(import_graph(tmp_path / "compat", type_checking=True)) == [loop]
    assert cycles(import_graph(tmp_path / "compat")) == []  # what the check saw before


def test_an_unplaced_module_is_named(tmp_path: Path) -> None:
    (tmp_path / "compat").mkdir()
    (tmp_path / "compat" / "__init__.py").write_text("")
    (tmp_path / "compat" / "brand_new.py").write_text("import compat.declare.cells\n")
    assert [m for m in modules(tmp_path / "compat") if layer_of(m) is None] == ["compat.brand_new"]


def test_pytest_plugin_imports_nothing_heavy() -> None:
    """Every pytest run of a project that installs the package loads the plugin: it must cost nothing."""
    code = "import sys, compat.pytest_plugin; print(' '.join(sorted(m for m in sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    heavy = sorted(m for m in ("torch", "megatron", "transformers", "peft", "numpy") if m in loaded)
    assert not heavy, f"loading the pytest plugin imported {heavy}"
    packages = {".".join(m.split(".")[:i]) for m in PLUGIN_LOADS for i in range(1, m.count(".") + 1)}
    extra = sorted(m for m in loaded if m.split(".")[0] == "compat" and m not in PLUGIN_LOADS | packages)
    assert not extra, f"loading the pytest plugin imported compat modules beyond {sorted(PLUGIN_LOADS)}: {extra}"


def test_every_public_name_loads() -> None:
    """``compat.__all__`` resolves lazily: a name whose module moved or lost it fails here, not downstream."""
    namespace: dict[str, object] = {}
    exec("from compat import *", namespace)  # the star import downstream users write
    assert sorted(set(namespace) - {"__builtins__"}) == sorted(__import__("compat").__all__)
