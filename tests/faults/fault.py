"""What a planted fault is: the smallest cell that shows it, what it patches, what the cell must report.

``catalogue.py`` lists the faults; this module holds only their shape, so wrapper modules and the
catalogue can share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from faults.tamper import Wrap

__all__ = ["Fault"]


@dataclass(frozen=True)
class Fault:
    name: str
    about: str
    family: str
    layout: str
    # (module, attribute path inside it, wrapper of the original)
    patches: tuple[tuple[str, str, Wrap], ...]
    expect: tuple[str, ...] = ()  # regexes the reason must match in every dtype (re.search, DOTALL)
    fp32: tuple[str, ...] = ()  # and in fp32 cells
    kind: str = "check"
    status: str = "fail"
    timeout: float | None = None
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    notes: dict[str, Any] = field(default_factory=dict)
    sync: str = "file"  # memory: a fault of the adapter stream a rollout takes (faults/stream.py)

    @property
    def id(self) -> str:
        return self.name

    def patterns(self, dtype: str) -> tuple[str, ...]:
        return self.expect + (self.fp32 if dtype == "fp32" else ())
