"""What a rank concludes other than ``pass``: a failed check, or a cell that cannot be built here.

Both are results, not crashes: the worker turns them into a ``fail`` or ``unsupported`` record.
Anything else a rank raises is an ``error`` (the run broke), reported with its traceback.
"""

from __future__ import annotations

from typing import Any

from compat.checks.problems import Problem, joined

__all__ = ["CheckFailed", "Unsupported"]


class CheckFailed(Exception):
    """Checks failed: the cell's status is ``fail`` with these problems (and the metrics measured so far).

    A bare string is one problem of an unnamed check (``check``). ``not_run``: the checks that these
    problems left nothing to check, and why; the reason says so.
    """

    def __init__(self, problems: list[Problem] | str, metrics: dict[str, Any] | None = None, not_run: str = "") -> None:
        self.problems = [Problem("check", problems)] if isinstance(problems, str) else list(problems)
        self.not_run = not_run
        self.reason = joined(self.problems) + (f"; not run: {not_run}" if not_run else "")
        super().__init__(self.reason)
        self.metrics = metrics or {}


class Unsupported(Exception):
    """The cell cannot be built here; the reason names the upstream file and line or the missing package.

    Only for what is missing here (Transformer Engine and what only it provides) or what upstream
    declares it does not do (an unregistered architecture, a ``NotImplementedError``): any other
    upstream exception is an error, so a regression cannot hide as "unsupported".
    """
