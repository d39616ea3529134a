"""megatron-lora-compat: does a LoRA adapter survive Megatron -> dist checkpoint -> HF PEFT?

The public API (docs/reference/api.md): build cells, run them, read their results. Importing this
package imports neither torch nor megatron, nor any module of its own: each public name loads its
module when first used (PEP 562), so the pytest plugin, which every pytest run that has the
package installed loads, costs those runs nothing. Cells run in rank processes of their own.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Each public name and the module that defines it: the one table of where the API lives.
_HOMES = {
    "TOLERANCES": "compat.checks.compare",
    "Adapter": "compat.declare.adapters",
    "Cell": "compat.declare.cells",
    "CellResult": "compat.results.record",
    "Expected": "compat.declare.expected",
    "Family": "compat.declare.families",
    "Layout": "compat.declare.layouts",
    "Matrix": "compat.declare.matrix",
    "Plugins": "compat.declare.plugins",
    "Tolerance": "compat.checks.compare",
    "adapters": "compat.declare.adapters",
    "add_adapters": "compat.declare.adapters",
    "add_families": "compat.declare.families",
    "check_adapter_dir": "compat.checks.peft_files",
    "compare": "compat.checks.compare",
    "families": "compat.declare.families",
    "load_expectations": "compat.declare.expected",
    "load_matrix": "compat.declare.matrix",
    "read_results": "compat.results.record",
    "run_cell": "compat.launch.launcher",
    "write_results": "compat.results.record",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'compat' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
