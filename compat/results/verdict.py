"""A cell phase's verdict from its ranks' records: the first rank to stop is the cause.

Each rank writes a record (or dies without one); the launcher reduces them to one status and
one reason. A failed check or an error names the rank that stopped first: its peers' breakage
("connection closed" in a collective) follows from it and is listed after it. The problems are
every rank's, the cause's first: a peer's other error is one more problem an expectation must
cover, not text after the cause.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, replace
from typing import Any

from compat.checks.problems import Problem, logged_problems, problems_of

__all__ = ["LOG_TAIL", "RankOutcome", "verdict"]

LOG_TAIL = 4000


@dataclass
class RankOutcome:
    rank: int
    returncode: int | None
    record: dict[str, Any] | None
    log: str

    @property
    def status(self) -> str:
        if self.record is not None:
            return self.record["status"]
        return "error"

    def describe_death(self) -> str:
        rc = self.returncode
        if rc is None:
            how = "was still running"
        elif rc < 0:
            how = f"was killed by signal {signal.Signals(-rc).name}"
        else:
            how = f"exited with code {rc} without a result"
        return f"rank {self.rank} {how}; its output ends:\n{_log_tail(self.log)}"


_DUMP_HEADER = re.compile(r"^(?:Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$", re.MULTILINE)


def _log_tail(log: str) -> str:
    """The end of a rank's log; with a stack dump, the dump from its top (the innermost frame).

    faulthandler prints the innermost frame first, so a plain tail of a deep stack (an import
    chain) would cut exactly the frame where the rank hung.
    """
    headers = list(_DUMP_HEADER.finditer(log))
    if not headers:
        return log[-LOG_TAIL:]
    start = headers[0].start()
    before, dump = log[max(start - LOG_TAIL // 4, 0) : start], log[start:]
    if len(dump) > 2 * LOG_TAIL:
        dump = dump[: 3 * LOG_TAIL // 2] + "\n  ...\n" + dump[-LOG_TAIL // 2 :]
    return before + dump


def verdict(outcomes: list[RankOutcome], cut: str, phase: str) -> tuple[str, str, dict[str, Any], list[Problem]]:
    """(status, reason, metrics, problems) of one phase: the first rank to stop is the cause.

    Errors, then failed checks, unless a check failed before any error: peers left in a collective
    by a failing rank then break there ("connection closed"), after the fact. ``unsupported`` only
    when every rank said so or passed, none died and nothing was cut short: a rank that could not
    build the cell does not excuse a peer's death or a timeout.
    """
    where = f"[{phase}] " if phase != "roundtrip" else ""

    def rec(o: RankOutcome) -> dict[str, Any]:
        """The record of a rank that left one (every group below is of those; the dead are ``dead``)."""
        assert o.record is not None, f"rank {o.rank} left no record"
        return o.record

    def first(group: list[RankOutcome]) -> RankOutcome:
        return min(group, key=lambda o: (rec(o).get("at", float("inf")), o.rank))

    def then(group: list[RankOutcome]) -> str:
        return "".join(f"\nthen rank {o.rank} raised {rec(o)['reason'][:200]}" for o in group)

    def placed(o: RankOutcome) -> list[Problem]:
        """The rank's problems, with the phase and (for an error) the rank in ``where``."""
        rank = f"rank {o.rank}" if rec(o)["status"] == "error" else ""
        out = []
        for p in problems_of(rec(o).get("problems")) or [Problem("run", rec(o)["reason"])]:
            out.append(replace(p, where=at(rank, p.where)))
        return out

    def everyone(cause: RankOutcome) -> list[Problem]:
        """Every rank's distinct problems, the cause's first: the records' (a failed check's are the same
        on every rank, agreed), and what a rank killed without one had logged (compat.rank.collective)."""
        out: list[Problem] = []
        for o in [cause, *(o for o in outcomes if o is not cause)]:
            if o.record is None:
                found = logged_problems(o.log, at(f"rank {o.rank}"))
            else:
                found = placed(o) if o.record["status"] != "pass" else []
            out += [p for p in found if p not in out]
        return out

    def at(*parts: str) -> str:
        """Where a problem was found: the phase (when not the round trip), the rank, the check's own place."""
        return ", ".join(x for x in (phase if where else "", *parts) if x)

    errors = [o for o in outcomes if o.record and o.record["status"] == "error"]
    fails = [o for o in outcomes if o.record and o.record["status"] == "fail"]
    dead = [o for o in outcomes if o.record is None]
    failed_first = bool(fails) and (
        not errors or rec(first(fails)).get("at", float("inf")) < rec(first(errors)).get("at", float("inf"))
    )
    if errors and not failed_first:
        # The first rank to break is the cause; peers then fail in a collective ("connection closed").
        o = first(errors)
        rest = [e for e in errors if e is not o]
        reason = f"{where}rank {o.rank} raised {rec(o)['reason']}\n{rec(o)['traceback']}{then(rest)}"
        return "error", reason, {}, everyone(o)
    unsupported = [o for o in outcomes if o.record and o.record["status"] == "unsupported"]
    if unsupported and not errors and not dead and not cut:
        return "unsupported", where + rec(unsupported[0])["reason"], {}, everyone(unsupported[0])
    if fails:
        # A check failed first; peers left in a collective by it may then break there.
        o = first(fails)
        return "fail", where + rec(o)["reason"] + then(errors), rec(o).get("metrics") or {}, everyone(o)
    if dead or cut:
        detail = "\n".join(o.describe_death() for o in dead)
        problems = [Problem("run", cut or "a rank died", phase if where else "")]
        problems += [Problem("run", o.describe_death().split(";")[0], phase if where else "") for o in dead]
        # what a rank found before it was left waiting for its peers (compat.rank.collective)
        problems += [p for o in dead for p in logged_problems(o.log, at(f"rank {o.rank}"))]
        return "error", f"{where}{cut or 'a rank died'}\n{detail}".rstrip(), {}, problems
    return "pass", "", outcomes[0].record.get("metrics", {}) if outcomes[0].record else {}, []
