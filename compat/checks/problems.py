"""A cell's problems as data: which check found what, and where (a rank, a file and line).

A cell's ``reason`` is their messages joined, for people; expectations match the list itself, so
a problem nobody expected cannot hide inside a reason that also holds the expected one.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Listed", "Problem", "joined", "keyed_tensors", "log_line", "logged_problems", "problem_key", "problems_of"]


class Listed(str):
    """A check's message that names a few of the tensors it is about ("12 of 64 ..., e.g. a, b") and
    carries every one of them: the :class:`Problem` made of it keeps the full list in ``tensors``.

    A string, so a check can go on returning messages and its callers wrap them as before.
    """

    tensors: tuple[str, ...]

    def __new__(cls, message: str, tensors: Iterable[str]) -> Listed:
        listed = super().__new__(cls, message)
        listed.tensors = tuple(tensors)
        return listed


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

    def __post_init__(self) -> None:
        if isinstance(self.message, Listed):  # a check's message with its tensors: both kept, as data
            object.__setattr__(self, "tensors", self.tensors or self.message.tensors)
            object.__setattr__(self, "message", str(self.message))

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


# What a message listing tensors says of them: its counts, and the few it shows after "e.g.".
_COUNTED = re.compile(r"\b\d+\b")
_EXAMPLES = re.compile(r",? e\.g\. .*", re.DOTALL)


def keyed_tensors(problem: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """A problem as the gate compares it tensor by tensor: (its key, the tensors it names).

    A problem listing tensors is keyed by what it says of all of them (counts masked, the "e.g."
    and what follows dropped): the same problem with one more tensor has the same key and one more
    tensor, so the gate names that tensor.
    """
    tensors = tuple(problem.get("tensors") or ())
    if not tensors:
        return problem_key(problem), ()
    header = _COUNTED.sub("#", _EXAMPLES.sub("", str(problem.get("message", ""))))
    return f"[{problem.get('check', '')}] {header}", tensors


# A rank writes what it found to its log before it hands it to its peers: when a peer is stuck in
# another collective (an upstream one), the exchange never returns and the rank is killed at the
# cell's deadline, so its record is never written; the verdict reads these lines back from its log.
_LOGGED = "compat-problem: "


def log_line(check: str, message: str, tensors: Iterable[str] = ()) -> str:
    """One line of a rank's log holding a problem it found (and the tensors it names)."""
    return _LOGGED + json.dumps([check, message, list(tensors)])


def logged_problems(log: str, where: str) -> list[Problem]:
    """The problems a rank wrote to its log (``log_line``), each once, in order."""
    out: list[Problem] = []
    for line in log.splitlines():
        if line.startswith(_LOGGED):
            with contextlib.suppress(ValueError, TypeError):
                check, message, *tensors = json.loads(line[len(_LOGGED) :])
                problem = Problem(str(check), str(message), where, tuple(map(str, tensors[0] if tensors else ())))
                if problem not in out:
                    out.append(problem)
    return out
