"""Every wait before a cell's own deadline is bounded: the fork server's answers, GPUs to come free.

Before: the launcher read the fork server's lines with a plain ``readline`` and waited for GPUs with
an untimed ``wait_for``; a server stuck importing, or GPUs held forever, hung the run.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from compat import forkserver
from compat.gpus import Devices, NoGPUs


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
