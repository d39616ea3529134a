"""A cell's verdict names the rank that stopped first: its peers' breakage follows from it."""

import pytest

from compat.checks.problems import log_line
from compat.results.verdict import RankOutcome, verdict


def _rank(rank: int, status: str, at: float, reason: str) -> RankOutcome:
    record = {"rank": rank, "status": status, "reason": reason, "at": at}
    if status == "error":
        record["traceback"] = "Traceback (most recent call last): ..."
    return RankOutcome(rank, 0, record, "")


@pytest.mark.parametrize(
    ("ranks", "phase", "status", "starts", "then"),
    [
        pytest.param(  # the merged export raised on rank 0 while rank 1 was in its all-gather
            [(0, "fail", 10.0, "the bridge's merged HF export raised RuntimeError"),
             (1, "error", 11.0, "RuntimeError: Connection closed by peer")],
            "roundtrip", "fail", "the bridge's merged HF export raised", "then rank 1 raised RuntimeError: Connection",
            id="check-failed-first",
        ),
        pytest.param(
            [(0, "fail", 12.0, "logits differ"), (1, "error", 11.0, "ValueError: bad shard")],
            "load", "error", "[load] rank 1 raised ValueError: bad shard", "",
            id="error-first",
        ),
        pytest.param(
            [(0, "error", 5.0, "RuntimeError: Connection closed"), (1, "error", 4.0, "KeyError: 'x'")],
            "roundtrip", "error", "rank 1 raised KeyError", "then rank 0 raised RuntimeError: Connection closed",
            id="first-of-two-errors",
        ),
    ],
)  # fmt: skip
def test_the_first_rank_to_stop_is_the_cause(ranks, phase, status, starts, then):
    got_status, reason, _, _ = verdict([_rank(*r) for r in ranks], "", phase)
    assert got_status == status
    assert reason.startswith(starts)
    assert then in reason


def test_unsupported_names_the_reason_and_is_not_an_error():
    outcomes = [RankOutcome(r, 0, {"rank": r, "status": "unsupported", "reason": "needs transformer_engine"}, "")
                for r in (0, 1)]  # fmt: skip
    status, reason, _, problems = verdict(outcomes, "", "roundtrip")
    assert (status, reason) == ("unsupported", "needs transformer_engine")
    assert [p.message for p in problems] == ["needs transformer_engine"]


@pytest.mark.parametrize("cut", ["", "timed out after 60s"])
def test_unsupported_does_not_excuse_a_dead_rank_or_a_timeout(cut):
    """Rank 0 unsupported and rank 1 killed (or the phase timed out) is ``error``: a death is never excused."""
    peer = {"rank": 1, "status": "unsupported", "reason": "x"} if cut else None  # timed out, or died
    outcomes = [RankOutcome(0, 0, {"rank": 0, "status": "unsupported", "reason": "needs transformer_engine"}, ""),
                RankOutcome(1, -9, peer, "")]  # fmt: skip
    status, reason, _, problems = verdict(outcomes, cut, "roundtrip")
    assert status == "error", reason
    assert problems and problems[0].check == "run"


def test_problems_come_back_placed_by_phase_and_rank():
    record = {"rank": 1, "status": "error", "reason": "KeyError: 'x'", "traceback": "...", "at": 1.0,
              "problems": [{"check": "run", "message": "KeyError: 'x'", "where": "megatron/core/a.py:3"}]}  # fmt: skip
    _, _, _, problems = verdict([_rank(0, "pass", 2.0, ""), RankOutcome(1, 1, record, "")], "", "load")
    assert [p.as_dict() for p in problems] == [
        {"check": "run", "message": "KeyError: 'x'", "where": "load, rank 1, megatron/core/a.py:3"}
    ]


def test_a_rank_that_died_without_a_result_is_an_error_with_its_output():
    outcomes = [_rank(0, "pass", 1.0, ""), RankOutcome(1, -9, None, "line 1\nSegmentation fault in libfoo")]
    outcomes[0].record.update(metrics={})
    status, reason, _, _ = verdict(outcomes, "", "save")
    assert status == "error"
    assert reason.startswith("[save] a rank died")
    assert "rank 1 was killed by signal SIGKILL; its output ends:" in reason and "Segmentation fault" in reason


def test_a_timeout_shows_the_stack_dump_from_its_innermost_frame():
    dump = 'Thread 0x00007f0 (most recent call first):\n  File "x.py", line 3 in planted_hang_forever\n'
    log = "import noise\n" * 2000 + dump + '  File "y.py", line 9 in <module>\n' * 400
    outcomes = [_rank(0, "pass", 1.0, ""), RankOutcome(1, -9, None, log)]
    status, reason, _, _ = verdict(outcomes, "timed out after 60s", "roundtrip")
    assert status == "error" and reason.startswith("timed out after 60s")
    assert "in planted_hang_forever" in reason  # the innermost frame survives the tail


def test_a_rank_left_waiting_still_names_what_it_found():
    """megatron-core validates a load's sharding on rank 0 only (dist_checkpointing/validation.py:388 of
    0.17.1) and raises there while its peers enter torch's load collective: rank 0's exchange of the
    problem never returns, both are killed at the deadline, and the problem is read from rank 0's log."""
    log = "INFO: loading\n" + log_line("checkpoint load", "the checkpoint does not load: ShardedObject are missing\n")
    log += "\n" + log_line("checkpoint load", "the checkpoint does not load: ShardedObject are missing\n") + "\n"
    outcomes = [RankOutcome(0, -9, None, log), RankOutcome(1, -9, None, "in torch.distributed.checkpoint")]
    status, _, _, problems = verdict(outcomes, "timed out after 420s", "load")
    assert status == "error"
    assert [p.as_dict() for p in problems if p.check != "run"] == [
        {"check": "checkpoint load", "message": "the checkpoint does not load: ShardedObject are missing\n",
         "where": "load, rank 0"}
    ]  # fmt: skip
    assert next(p.message for p in problems if p.check == "run") == "timed out after 420s"


def test_every_rank_s_problems_enter_the_list_the_first_rank_s_first():
    """Before: only the first erroring (or failing) rank's problems were kept; rank 0's other error was in
    the reason's text alone, so an expectation covering rank 1's problem was met with it there."""

    def record(rank: int, status: str, at: float, *messages: str) -> RankOutcome:
        problems = [{"check": "run", "message": m, "where": "megatron/core/a.py:3"} for m in messages]
        return RankOutcome(rank, 1, {"rank": rank, "status": status, "reason": "; ".join(messages),
                                     "traceback": "...", "at": at, "problems": problems}, "")  # fmt: skip

    outcomes = [record(0, "error", 5.0, "KeyError: 'y'"), record(1, "error", 4.0, "KeyError: 'x'")]
    status, reason, _, problems = verdict(outcomes, "", "roundtrip")
    assert status == "error" and reason.startswith("rank 1 raised KeyError: 'x'")
    assert [p.text() for p in problems] == [
        "rank 1, megatron/core/a.py:3: KeyError: 'x'",
        "rank 0, megatron/core/a.py:3: KeyError: 'y'",
    ]
    agreed = {"check": "files", "message": "the export has no adapter for 2 of the 4 modules", "where": "rank 0"}
    fail = RankOutcome(0, 0, {"rank": 0, "status": "fail", "reason": "r", "at": 1.0, "problems": [agreed]}, "")
    same = RankOutcome(1, 0, {"rank": 1, "status": "fail", "reason": "r", "at": 2.0, "problems": [agreed]}, "")
    peer = record(2, "error", 3.0, "RuntimeError: Connection closed by peer")
    passed = RankOutcome(3, 0, {"rank": 3, "status": "pass", "reason": "", "at": 1.0, "metrics": {}}, "")
    log = log_line("checkpoint load", "rank 4 found this", ["a.weight"])
    status, _, _, problems = verdict([fail, same, peer, passed, RankOutcome(4, -9, None, log)], "", "roundtrip")
    assert status == "fail"
    assert [(p.where, p.message, p.tensors) for p in problems] == [
        ("rank 0", agreed["message"], ()),  # once, though both ranks hold it
        ("rank 2, megatron/core/a.py:3", "RuntimeError: Connection closed by peer", ()),
        ("rank 4", "rank 4 found this", ("a.weight",)),
    ]
