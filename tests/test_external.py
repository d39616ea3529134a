"""Cells under an external launcher (torchrun): records gathered over collectives, a fresh directory per run.

Each run's cells get a directory of their own, so a record file left by an earlier run with torchrun's
default run id "none" (here: a planted ``fail``) is never read as this run's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cell

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, workdir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    matrix = tmp_path / "m.toml"
    matrix.write_text('[[cells]]\nfamilies = ["llama"]\nlayouts = ["tp=2", "tp1"]\n')
    (tmp_path / "expected.toml").write_text(
        '[[expect]]\ncells = "llama.tp1"\nstatus = "unsupported"\nreason = "a one-rank cell in a two-rank launch"\n'
        'match = "world_size 1 != WORLD_SIZE 2 of this launch"\n'
    )
    env = {**os.environ, "COMPAT_WORKDIR": str(workdir), "TMPDIR": str(workdir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "compat", "run", "--matrix", str(matrix),
           "--backend", "cpu", "--output", str(out)]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_run_under_torchrun_reads_only_its_own_ranks(tmp_path):
    workdir = tmp_path / "work"
    stale = workdir / "compat-none" / "llama.tp2"  # where the old scheme put (and read) records
    stale.mkdir(parents=True)
    (stale / "roundtrip-rank1.json").write_text(json.dumps({"rank": 1, "status": "fail", "reason": "stale record"}))
    for n in (1, 2):  # twice: the second run must not see the first's files either
        out = tmp_path / f"results{n}.json"
        proc = _torchrun(tmp_path, workdir, out)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        cells = {c["id"]: c for c in json.loads(out.read_text())["cells"]}
        assert cells["llama.tp2"]["status"] == "pass", cells["llama.tp2"]["reason"]
        assert cells["llama.tp1"]["status"] == "unsupported"
        assert cells["llama.tp1"]["reason"] == "world_size 1 != WORLD_SIZE 2 of this launch"
    assert "stale record" not in json.dumps(cells)
