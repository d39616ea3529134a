"""Every wait before a cell's own deadline is bounded: the fork server's answers, GPUs to come free.

The launcher reads the fork server's lines and waits for GPUs with a deadline: a server stuck importing,
or GPUs held forever, end in a bounded error, not a hung run.
"""

from __future__ import annotations

import subprocess
import sys
import time
import types

import pytest

from compat.launch import forkserver
from compat.launch.gpus import Devices, NoGPUs


def test_a_fork_server_that_does_not_answer_is_given_up_on():
    silent = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        assert forkserver._readline(silent, 0.5) == ""
        assert time.monotonic() - start < 2
    finally:
        silent.kill()
        silent.wait()


def test_a_wait_for_gpus_evicts_idle_groups_then_gives_up():
    devices = Devices([0, 1])
    assert devices.take(2, timeout=1) == [0, 1]
    asked = []
    start = time.monotonic()
    with pytest.raises(NoGPUs, match=r"waited 0s for 1 free GPUs \(all 2 busy\)"):
        devices.take(1, timeout=0.3, evict=lambda: asked.append(1) is None and len(asked) < 3)
    assert time.monotonic() - start < 2 and len(asked) >= 3
    devices.give([1])
    assert devices.take(1, timeout=0.1) == [1]


def test_more_gpus_than_the_machine_has_are_refused_at_once():
    with pytest.raises(NoGPUs, match="needs 4 GPUs, 2 visible here"):
        Devices([0, 1]).take(4, timeout=60)


def test_a_server_that_ran_start_up_code_refuses_another_compat_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # sitecustomize read the server's environment when it started; a child with another COMPAT_FAULT
    # would silently run without the fault a fresh interpreter would have planted.
    from compat.launch.forkserver import refusal

    base = {"PATH": "/bin", "COMPAT_RANKS": "warm"}
    monkeypatch.delitem(sys.modules, "sitecustomize", raising=False)
    monkeypatch.delitem(sys.modules, "usercustomize", raising=False)
    assert refusal({**base, "COMPAT_FAULT": "qk_rows_swapped"}, base) == ""
    assert refusal({**base, "COMPAT_RANKS": "fork"}, base) == ""  # the harness's own: read when a cell runs
    assert "environment differs in FOO" in refusal({**base, "FOO": "1"}, base)
    monkeypatch.setitem(sys.modules, "sitecustomize", types.ModuleType("sitecustomize"))
    assert "environment differs in COMPAT_FAULT (this server ran sitecustomize" in refusal(
        {**base, "COMPAT_FAULT": "qk_rows_swapped"}, base
    )
    assert refusal({**base, "COMPAT_RANKS": "fork"}, base) == ""
