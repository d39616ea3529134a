"""What a rank concludes other than ``pass``: a failed check, or a cell that cannot be built here.

Both are results, not crashes: the worker turns them into a ``fail`` or ``unsupported`` record.
Anything else a rank raises is an ``error`` (the run broke), reported with its traceback.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CheckFailed", "Unsupported"]


class CheckFailed(Exception):
    """A check failed: the cell's status is ``fail`` with this reason (and the metrics measured so far)."""

    def __init__(self, reason: str, metrics: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metrics = metrics or {}


class Unsupported(Exception):
    """The cell cannot be built here; the reason names the upstream file and line or the missing package.

    Only for what is missing here (Transformer Engine and what only it provides) or what upstream
    declares it does not do (an unregistered architecture, a ``NotImplementedError``): any other
    upstream exception is an error, so a regression cannot hide as "unsupported".
    """
