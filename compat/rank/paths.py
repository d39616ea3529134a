"""The files of one cell, in one directory that no other cell shares: every name is spelled here.

The launcher writes the task, the ranks write their logs, result records, the adapter
checkpoint, the exports and their activations; rank 0 reads what the others wrote.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CellPaths", "task_file", "write_json_atomic"]


@dataclass(frozen=True)
class CellPaths:
    """Where a cell's launches read and write."""

    root: Path
    hf: Path  # the tiny HF base model: per cell, or a read-only cached copy shared by cells

    @classmethod
    def under(cls, root: Path, hf: Path | None = None) -> CellPaths:
        return cls(Path(root), Path(hf) if hf is not None else Path(root) / "hf")

    # -- written by the launcher and the ranks --------------------------------------------------
    def task(self, phase: str) -> Path:
        return self.root / f"task-{phase}.json"

    def log(self, phase: str, rank: int) -> Path:
        return self.root / f"{phase}-rank{rank}.log"

    def result(self, phase: str, rank: int) -> Path:
        return self.root / f"{phase}-rank{rank}.json"

    # -- what the round trip writes ----------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def reference_adapter(self) -> Path:
        """The export at the save layout, which a resharded load must reproduce bit for bit."""
        return self.root / "adapter-at-save-layout"

    @property
    def merged(self) -> Path:
        """The full HF checkpoint the bridge exports with adapter weights merged."""
        return self.root / "merged-hf"

    @property
    def peft_merged(self) -> Path:
        """peft's merge of the adapter export, saved in checkpoint naming to compare with :attr:`merged`."""
        return self.root / "peft-merged-hf"

    @property
    def plugin_record(self) -> Path:
        """What the user's plugins wrote and called, one entry per call (rank 0's; ``compat.rank.plugin_calls``)."""
        return self.root / "plugin-calls.json"

    @property
    def plugin_tmp(self) -> Path:
        """``TMPDIR`` while a user's plugin runs: its temporary files stay the cell's."""
        return self.root / "tmp"

    def plugin_calls(self) -> list[dict[str, Any]]:
        return json.loads(self.plugin_record.read_text()) if self.plugin_record.is_file() else []

    def record_plugin_call(self, entry: dict[str, Any]) -> None:
        write_json_atomic(self.plugin_record, [*self.plugin_calls(), entry])

    def where(self, asked: Path) -> Path:
        """Where a plugin put what the harness asked for at ``asked`` (the path it returned), else ``asked``."""
        wrote = [e["wrote"] for e in self.plugin_calls() if e.get("asked") == self.relative(asked) and e.get("wrote")]
        return self.root / wrote[-1] if wrote else asked

    def relative(self, path: Path) -> str:
        return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root)))

    @property
    def memory(self) -> Path:
        """The adapter as a memory sync hands it to an engine's process (``compat.rank.memory_sync``)."""
        return self.root / "memory"

    @property
    def memory_sync(self) -> Path:
        """What the memory sync measured (rank 0), the cell's ``metrics.memory_sync``."""
        return self.root / "memory-sync.json"

    @property
    def delta_oracle(self) -> Path:
        """The at-rest oracle's entries, every rank's, written by rank 0 (``compat.rank.delta_oracle``)."""
        return self.root / "delta-oracle.json"

    @property
    def forward_oracle(self) -> Path:
        """Megatron's in-flight oracle entries, every rank's, written by rank 0 (``compat.rank.forward_oracle``)."""
        return self.root / "forward-oracle.json"

    def activations(self, tag: str, pp_rank: int) -> Path:
        """One pipeline stage's activations of a Megatron forward (``tag``: adapter or merged)."""
        return self.root / f"megatron-{tag}-pp{pp_rank}.pt"

    def all_activations(self, tag: str) -> list[Path]:
        return sorted(self.root.glob(f"megatron-{tag}-pp*.pt"))


def task_file(group_dir: Path, rank: int, seq: int) -> Path:
    """The next task of a rank of a group: written by the launcher (``compat.launch.pool``), read by the rank."""
    return group_dir / f"rank{rank}-{seq}.task"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write through a temporary file and rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    tmp.replace(path)
