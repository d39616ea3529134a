"""Run faults: a rank that raises, a rank that hangs, upstream code that raises, two cells at once, Ctrl-C.

The harness must turn each into a result (``error`` with the rank's traceback or stack dump),
keep running other cells, and leave no process of a broken cell behind; ranks that finished a
cell cleanly wait warm in the pool until it shuts down, and then nothing is left either.
Processes are found by a unique token put in the environment (ranks inherit it) and looked up in
/proc/*/environ.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from faults.catalogue import by_name
from test_faults import REPO, cell_of, plant, run, unmatched

pytestmark = pytest.mark.cell

TOKEN_VAR = "COMPAT_TEST_TOKEN"


def processes_with(token: str) -> list[int]:
    """Pids (other than this one) whose environment holds ``COMPAT_TEST_TOKEN=<token>``."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _as_from_a_terminal() -> None:
    """SIGINT deliverable and default, as in a shell: a test runner's process may pass on a mask or
    disposition that blocks or ignores it (seen only inside the full xdist suite)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_state(pid: int) -> str:
    try:
        lines = (Path("/proc") / str(pid) / "status").read_text().splitlines()
    except OSError:
        return "gone"
    return ", ".join(line for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def idle_ranks() -> set[int]:
    """Pids of the rank processes waiting warm in this process's pool, and their children."""
    from compat.launch.pool import pool

    ranks = {p.pid for g in pool()._idle for p in g.procs}
    return ranks | {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _parent(pid) in ranks}


def ranks_with(token: str) -> list[int]:
    """Rank processes: started cold (``compat.rank.worker``) or forked by the fork server (its children)."""
    pids = []
    for pid in processes_with(token):
        cmd = _cmdline(pid)
        if b"compat.rank.worker" in cmd or (
            b"compat.launch.forkserver" in cmd and b"compat.launch.forkserver" in _cmdline(_parent(pid))
        ):
            pids.append(pid)
    return pids


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    value = uuid.uuid4().hex
    monkeypatch.setenv(TOKEN_VAR, value)
    return value


def test_rank_that_raises_is_an_error_and_other_cells_still_run(monkeypatch, tmp_path, compat_backend, token):
    """Rank 1 of llama.tp2 raises; llama.tp1 runs at the same time (it has no rank 1) and passes."""
    fault = by_name("rank1_raises")
    plant(monkeypatch, fault.name)
    from compat.declare.cells import Cell
    from compat.declare.layouts import Layout
    from compat.launch.launcher import run_cell

    results = {}

    def one(layout: str) -> None:
        cell = Cell.make("llama", Layout.parse(layout))
        results[layout] = run_cell(cell, compat_backend, keep=True, workdir=tmp_path)

    threads = [threading.Thread(target=one, args=(layout,)) for layout in ("tp=2", "tp1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    broken, clean = results["tp=2"], results["tp1"]
    assert broken.status == "error", broken.reason
    assert not unmatched(fault, broken.reason), broken.reason
    assert clean.status == "pass", clean.reason
    # Two cells at once: each in its own directory, rendezvous and checkpoint inside it.
    roots = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [r.name.split("-")[0] for r in roots] == ["llama.tp1", "llama.tp2"], roots
    for root in roots:
        task = (root / "task-roundtrip.json").read_text()
        assert f'"root": "{root}"' in task
        assert (root / "checkpoint").is_dir()
    # The broken cell's ranks are gone; the clean one's wait warm, and go with the pool.
    assert set(processes_with(token)) <= idle_ranks()
    from compat.launch.pool import pool

    pool().shutdown()
    assert not processes_with(token)


def test_hung_rank_times_out_with_its_stack_and_leaves_no_process(monkeypatch, tmp_path, compat_backend, token):
    fault = by_name("rank1_hangs")
    plant(monkeypatch, fault.name)
    start = time.monotonic()
    result = run(fault, compat_backend, tmp_path)
    assert result.status == "error", result.reason
    assert not unmatched(fault, result.reason), result.reason
    header = r"(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):\n"
    dump = re.search(header + r"(.*\n)*?.*in planted_hang", result.reason)
    assert dump, f"no stack dump reaching the hung frame:\n{result.reason}"
    assert time.monotonic() - start < fault.timeout + 60
    assert not processes_with(token), "processes of the timed-out cell survived"


def test_upstream_code_that_raises_is_an_error_not_unsupported(monkeypatch, tmp_path, compat_backend):
    """An upstream exception while building (weight conversion included) is an ``error``, not ``unsupported``."""
    fault = by_name("conversion_raises")
    plant(monkeypatch, fault.name)
    result = run(fault, compat_backend, tmp_path)
    assert result.status == "error", result.reason
    assert not unmatched(fault, result.reason), result.reason


@pytest.mark.parametrize("name", ["bridge_module_missing", "te_spec_builder_raises"])
def test_a_regression_that_looks_like_a_missing_component_is_an_error(name, monkeypatch, tmp_path, compat_backend):
    """A module missing inside megatron-bridge, or a spec builder's TypeError unrelated to TE, is an ``error``:
    ``unsupported`` is only for what is absent here, so neither can meet a family expected unsupported
    (minimax_m2)."""
    from compat.declare.expected import load_expectations
    from compat.declare.versions import installed_versions

    fault = by_name(name)
    plant(monkeypatch, fault.name)
    cell = cell_of(fault)
    expected = load_expectations(REPO / "matrix" / "expected.toml").for_cell(cell.id, installed_versions(), cell.spec)
    result = run(fault, compat_backend, tmp_path)
    assert result.status == "error", result.reason
    assert not unmatched(fault, result.reason), result.reason
    assert result.problems[0]["check"] == "run" and not result.met, (expected, result.unmet)


def test_ctrl_c_stops_every_rank(tmp_path, token):
    # Cold ranks spend seconds importing, so the interrupt lands while they run (forked ranks can finish first).
    env = {**os.environ, "COMPAT_FORKSERVER": "0"}
    out = tmp_path / "results.json"
    cli = subprocess.Popen(
        [sys.executable, "-m", "compat", "run", "--family", "llama", "--layout", "tp=2", "--output", str(out)],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        deadline = time.monotonic() + 120
        while len(ranks_with(token)) < 2:
            assert cli.poll() is None, cli.stdout.read().decode() if cli.stdout else ""
            assert time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.2)
        time.sleep(1)  # let them get into their imports
        state = _signal_state(cli.pid)
        cli.send_signal(signal.SIGINT)
        output, _ = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    text = output.decode(errors="replace")
    assert cli.returncode == 130, f"CLI signal state when interrupted: {state}\n{text}"
    assert re.search(r"interrupted", text), text
    assert not processes_with(token), f"rank processes survived Ctrl-C: {processes_with(token)}"
    assert not out.exists() or '"complete": false' in out.read_text(), "an interrupted run's results say complete"
