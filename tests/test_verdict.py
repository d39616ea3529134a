"""A cell's verdict names the rank that stopped first: its peers' breakage follows from it."""

from compat.launch import RankOutcome, verdict


def _rank(rank: int, status: str, at: float, reason: str) -> RankOutcome:
    record = {"rank": rank, "status": status, "reason": reason, "at": at}
    if status == "error":
        record["traceback"] = "Traceback (most recent call last): ..."
    return RankOutcome(rank, 0, record, "")


def test_a_check_failing_first_is_the_cause_of_a_peer_breaking_in_a_collective():
    status, reason, _ = verdict(
        [
            _rank(0, "fail", 10.0, "the bridge's merged HF export raised RuntimeError at lora_merge.py:70"),
            _rank(1, "error", 11.0, "RuntimeError: Connection closed by peer"),
        ],
        "",
        "roundtrip",
    )
    assert status == "fail"
    assert reason.startswith("the bridge's merged HF export raised")
    assert "then rank 1 raised RuntimeError: Connection closed by peer" in reason


def test_an_error_before_any_failed_check_is_the_cause():
    status, reason, _ = verdict(
        [
            _rank(0, "fail", 12.0, "logits differ"),
            _rank(1, "error", 11.0, "ValueError: bad shard"),
        ],
        "",
        "load",
    )
    assert status == "error"
    assert reason.startswith("[load] rank 1 raised ValueError: bad shard")


def test_the_first_of_several_errors_is_named_first():
    status, reason, _ = verdict(
        [_rank(0, "error", 5.0, "RuntimeError: Connection closed"), _rank(1, "error", 4.0, "KeyError: 'x'")],
        "",
        "roundtrip",
    )
    assert status == "error" and reason.startswith("rank 1 raised KeyError")
    assert "then rank 0 raised RuntimeError: Connection closed" in reason
