"""A cell's verdict names the rank that stopped first: its peers' breakage follows from it."""

import pytest

from compat.launch import RankOutcome, verdict


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
    got_status, reason, _ = verdict([_rank(*r) for r in ranks], "", phase)
    assert got_status == status
    assert reason.startswith(starts)
    assert then in reason
