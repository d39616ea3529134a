"""megatron-lora-compat: does a LoRA adapter survive Megatron -> dist checkpoint -> HF PEFT?

The public API (docs/downstream.md): build cells, run them, read their results. Importing this
package imports neither torch nor megatron; cells run in rank processes of their own.
"""

from compat.adapters import Adapter, adapters, add_adapters
from compat.cells import Cell
from compat.compare import TOLERANCES, Tolerance, compare
from compat.expected import Expected, load_expectations
from compat.families import Family, add_families, families
from compat.launch import run_cell
from compat.layouts import Layout
from compat.matrix import Matrix, load_matrix
from compat.peft_files import check_adapter_dir
from compat.plugins import Plugins
from compat.results import CellResult, read_results, write_results

__all__ = [
    "TOLERANCES",
    "Adapter",
    "Cell",
    "CellResult",
    "Expected",
    "Family",
    "Layout",
    "Matrix",
    "Plugins",
    "Tolerance",
    "adapters",
    "add_adapters",
    "add_families",
    "check_adapter_dir",
    "compare",
    "families",
    "load_expectations",
    "load_matrix",
    "read_results",
    "run_cell",
    "write_results",
]
