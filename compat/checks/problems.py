"""A cell's problems as data: which check found what, and where (a rank, a file and line).

A cell's ``reason`` is their messages joined, for people; expectations match the list itself, so
a problem nobody expected cannot hide inside a reason that also holds the expected one.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Problem", "joined", "log_line", "logged_problems", "problem_key", "problems_of"]


@dataclass(frozen=True)
class Problem:
    """One thing a check found wrong: ``check`` names the check, ``where`` the rank, phase or upstream line.

    ``tensors``: every tensor (or module) the problem is about, in full, where the message can show
    only a few ("12 of 64 weights ..., e.g. a, b"): an expectation is matched against all of them,
    so one more tensor is a new problem, not one the "e.g." hides.
    """

    check: str
    message: str
    where: str = ""
    tensors: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        if self.tensors:
            out["tensors"] = list(self.tensors)
        else:
            del out["tensors"]
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Problem:
        tensors = tuple(str(t) for t in raw.get("tensors") or ())
        return cls(str(raw["check"]), str(raw["message"]), str(raw.get("where", "")), tensors)

    def text(self) -> str:
        """As a reason shows it: ``rank 1: message``."""
        return f"{self.where}: {self.message}" if self.where else self.message


def joined(problems: list[Problem]) -> str:
    """The reason the problems make, one after another."""
    return "; ".join(p.text() for p in problems)


def problems_of(raw: list[dict[str, Any]] | None) -> list[Problem]:
    """Problems read back from a record or a results file (absent in files written before they existed)."""
    return [Problem.from_dict(p) for p in raw or []]


# Measured values inside a problem's message (a max |diff|, a share, a count of mismatched elements)
# vary with the machine; the problem is the same while its words and named tensors are.
_MEASURED = re.compile(r"\d+\.\d+(?:e[-+]\d+)?%?|\b\d+ / \d+\b")


def problem_key(problem: dict[str, Any]) -> str:
    """A problem as the gate and ``compat diff`` compare it: its check and message, measured values masked."""
    return f"[{problem.get('check', '')}] " + _MEASURED.sub("#", str(problem.get("message", "")))


# A rank writes what it found to its log before it hands it to its peers: when a peer is stuck in
# another collective (an upstream one), the exchange never returns and the rank is killed at the
# cell's deadline, so its record is never written; the verdict reads these lines back from its log.
_LOGGED = "compat-problem: "


def log_line(check: str, message: str) -> str:
    """One line of a rank's log holding a problem it found."""
    return _LOGGED + json.dumps([check, message])


def logged_problems(log: str, where: str) -> list[Problem]:
    """The problems a rank wrote to its log (``log_line``), each once, in order."""
    out: list[Problem] = []
    for line in log.splitlines():
        if line.startswith(_LOGGED):
            with contextlib.suppress(ValueError, TypeError):
                check, message = json.loads(line[len(_LOGGED) :])
                problem = Problem(str(check), str(message), where)
                if problem not in out:
                    out.append(problem)
    return out
