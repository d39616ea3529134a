"""The harness's own collectives: agree on problems, barrier, gather, on a gloo group of their own.

Why a group of their own: a rank that an upstream exception took out of an upstream collective
early then waits *here*, where no upstream collective of its peers can be matched with its own,
so the cell shows as a hang (stacks dumped) instead of ranks exchanging each other's unrelated
buffers; what the waiting rank found is in its log (``log_line``), for the verdict to name.
Created once per rank process, right after the default process group, as ``new_group``
requires every rank to take part.

Every check collects its problems per rank and calls :meth:`Collective.agree`, so a failing
check ends every rank together, with one reason, instead of leaving peers blocked.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from compat.checks.findings import CheckFailed
from compat.checks.problems import Problem, log_line

__all__ = ["Collective"]


class Collective:
    """Collectives over every rank of the cell, on the harness's own gloo group."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group if group is not None else dist.new_group(backend="gloo")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on every rank, in rank order."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj``, on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def agree(self, problems: Sequence[str | Problem], check: str) -> None:
        """Exchange ``check``'s problems between all ranks; raise the same :class:`CheckFailed` on every
        rank: for a problem that leaves later checks nothing to check."""
        merged = self.collect(problems, check)
        if merged:
            raise CheckFailed(merged)

    def collect(self, problems: Sequence[str | Problem], check: str) -> list[Problem]:
        """Every rank's problems of ``check``, the same list on every rank, for the cell to go on.

        A problem is a message, or a :class:`Problem` carrying its tensors (its own check kept). A
        problem every rank found is reported once, under the first rank that found it. Every problem
        is kept (each check already bounds its own list), so none escapes an expectation.
        """
        mine = [p if isinstance(p, Problem) else Problem(check, p) for p in problems]
        for p in mine:  # kept in the log should a peer never reach this exchange
            print(log_line(p.check, p.message, p.tensors), file=sys.stderr, flush=True)
        merged: list[Problem] = []
        seen: set[tuple[str, str, tuple[str, ...]]] = set()
        for rank, rank_problems in enumerate(self.gather([p.as_dict() for p in mine])):
            for raw in rank_problems or []:
                p = Problem.from_dict(raw)
                if (p.check, p.message, p.tensors) not in seen:
                    seen.add((p.check, p.message, p.tensors))
                    merged.append(Problem(p.check, p.message, f"rank {rank}", p.tensors))
        return merged
