"""What the Megatron side hands to HF: the adapter export, and the merged forms of the adapter.

The export is an *exporter*, a callable ``export(bridge, model, peft, path, base)`` run on every
rank where ``AutoBridge.save_hf_adapter`` runs by default (``compat.declare.plugins`` names others). The
merged forms are the other ways the same adapter reaches users: the bridge's merged full HF
export, and Megatron computing with the adapter merged into its weights. Each form is run, or
skipped with the reason, and that is reported; a merged export that raises is a failed check.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compat.checks.findings import CheckFailed
from compat.checks.problems import Problem
from compat.checks.upstream import describe
from compat.rank import bridge_api

__all__ = [
    "MEGATRON_MERGED",
    "MERGED_EXPORT",
    "MERGED_WEIGHTS",
    "PEFT_MERGED",
    "default_exporter",
    "merged_export",
    "merged_in_place",
]

MERGED_EXPORT = "bridge's merged HF export (save_hf_weights)"
MEGATRON_MERGED = "Megatron with adapters merged by the bridge"
PEFT_MERGED = "peft merge_and_unload"
MERGED_WEIGHTS = "peft's merged weights vs the bridge's merged HF export"


def default_exporter(bridge: Any, model: list, peft: Any, path: Path, base: Path) -> None:
    """``AutoBridge.save_hf_adapter``, as users call it after training."""
    bridge_api.save_hf_adapter(bridge, model, path, peft, base)


def merged_export(
    bridge: Any, model: list, path: Path, hf_dir: Path, adapter_problems: Callable[[], list[Problem]]
) -> str | None:
    """The bridge's merged full HF checkpoint; None when written, else why it was skipped."""
    return _finding(
        "the bridge's merged HF export (merge_adapter_weights=True)",
        lambda: bridge_api.save_hf_merged(bridge, model, path, hf_dir),
        adapter_problems,
    )


def merged_in_place(model: list, peft: Any, adapter_problems: Callable[[], list[Problem]]) -> str | None:
    """Megatron's own weights with the adapters merged by the bridge; None when merged, else why skipped."""
    return _finding("the bridge's in-place merge", lambda: bridge_api.merge_in_place(model, peft), adapter_problems)


def _finding(what: str, call: Callable[[], str | None], adapter_problems: Callable[[], list[Problem]]) -> str | None:
    """Run a merged form. Raising is this cell's finding, a failed check on the raising rank with what
    is wrong in the adapter export itself (``adapter_problems()``, read from the files every rank
    sees): every rank that raises says the same, so the verdict does not depend on which rank stops
    first. Peers left in the bridge's collectives are stopped by the launcher.
    """
    try:
        return call()
    except Exception as exc:
        traceback.print_exc()  # the full stack stays in this rank's log
        cause, where = (exc.cause, f" (merging {exc.module})") if isinstance(exc, bridge_api.MergeFailed) else (exc, "")
        raised = Problem("merged forms", f"{what} raised {describe(cause)}{where}")
        raise CheckFailed([*adapter_problems(), raised]) from exc
