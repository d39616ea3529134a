"""Plant the fault named by ``COMPAT_FAULT`` in this process (a cell's rank, or anything else).

Put this directory on PYTHONPATH: Python imports ``sitecustomize`` at start-up, and a cell's ranks
inherit the caller's environment. Without ``COMPAT_FAULT`` this does nothing. With it, the
upstream functions the fault names are patched right after their modules are imported; nothing
upstream is imported here (the harness must apply its Transformer Engine workaround first).
``COMPAT_FAULT_WITHOUT_MERGED_EXPORT=1`` also hides the bridge's merged export, so what catches the
fault cannot be the per-tensor merged-weight check (``scripts/faults-at-width``).
"""

import os


def _plant(name: str) -> None:
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    if "faults" not in sys.modules:  # the package alone, not the rest of tests/, goes on the import path
        here = Path(__file__).resolve().parent.parent  # tests/faults
        spec = importlib.util.spec_from_file_location(
            "faults", here / "__init__.py", submodule_search_locations=[str(here)]
        )
        assert spec is not None and spec.loader is not None
        sys.modules["faults"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["faults"])
    hook = importlib.import_module("faults.hook")
    catalogue = importlib.import_module("faults.catalogue")
    fault = catalogue.by_name(name)
    patches: dict = {}
    planted = list(fault.patches)
    if os.environ.get("COMPAT_FAULT_WITHOUT_MERGED_EXPORT") == "1":  # as releases before merge_adapter_weights
        planted.append(catalogue.WITHOUT_MERGED_EXPORT)
    for module_name, path, wrap in planted:
        patches.setdefault(module_name, []).append(
            lambda module, path=path, wrap=wrap: hook.patch_attribute(module, path, wrap)
        )
    hook.install(patches)


if os.environ.get("COMPAT_FAULT"):
    _plant(os.environ["COMPAT_FAULT"])
