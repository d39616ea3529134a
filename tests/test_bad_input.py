"""Bad input: one clear error, exit 2, before any worker starts, and no --output file.

"Before any worker starts" is checked by pointing TMPDIR at an empty directory: a launch makes
its cell directory there first, so it must stay empty.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUBS = Path(__file__).parent / "stubs"


def compat_run(tmp_path: Path, *args: str, env: dict[str, str] | None = None, output: bool = True) -> tuple[int, str]:
    """Run ``compat run`` on bad input; ``output=False`` leaves ``--output`` to its default, ./results.json."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out = tmp_path / "results.json"
    full_env = {**os.environ, "TMPDIR": str(tmpdir), **(env or {})}
    full_env.pop("COMPAT_FAULT", None)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), *full_env.get("PYTHONPATH", "").split(os.pathsep)]).rstrip(
        os.pathsep
    )
    proc = subprocess.run(
        [sys.executable, "-m", "compat", "run", *args, *(["--output", str(out)] if output else [])],
        env=full_env,
        cwd=REPO if output else tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert list(tmpdir.iterdir()) == [], "something was launched"
    assert not out.exists(), "--output was written for bad input"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, errors[0]


def _matrix(tmp_path: Path, text: str) -> str:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return str(path)


def _stub_env(**env: str) -> dict[str, str]:
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join([str(STUBS), str(REPO), *rest]), **env}


CASES = {
    "matrix_not_toml": (lambda t: ["--matrix", _matrix(t, "[[cells]\nfamilies = [")], r"not valid TOML"),
    "matrix_missing": (lambda t: ["--matrix", str(t / "nope.toml")], r"matrix file .*nope\.toml does not exist"),
    "matrix_unknown_key": (
        lambda t: ["--matrix", _matrix(t, 'colour = "red"\n[[cells]]\nfamilies = ["llama"]\nlayouts = ["tp1"]\n')],
        r"unknown top-level keys \['colour'\]",
    ),
    "matrix_unknown_family": (
        lambda t: ["--matrix", _matrix(t, '[[cells]]\nfamilies = ["gpt9"]\nlayouts = ["tp1"]\n')],
        r"unknown family 'gpt9'; none of the \d+ families is close \(python -m compat families lists them\)",
    ),
    "matrix_misspelt_block_key": (
        lambda t: ["--matrix", _matrix(t, '[[cells]]\nfamilies = ["llama"]\nlayout = ["tp1"]\n')],
        r"unknown keys \['layout'\] \('layout': did you mean 'layouts'",
    ),
    "matrix_unknown_sync": (
        lambda t: ["--matrix", _matrix(t, '[[cells]]\nfamilies = ["llama"]\nlayouts = ["tp1"]\nsync = ["ipc"]\n')],
        r"unknown sync 'ipc'; known syncs: file, memory",
    ),
    "unknown_family": (lambda t: ["--family", "gpt9", "--layout", "tp1"], r"unknown family 'gpt9'"),
    "misspelt_family": (
        lambda t: ["--family", "lama", "--layout", "tp1"],
        r"^error: unknown family 'lama'; did you mean 'llama'\?$",
    ),
    "misspelt_adapter": (
        lambda t: ["--family", "llama", "--layout", "tp1", "--adapter", "lroa"],
        r"unknown adapter 'lroa'; did you mean 'lora'\?",
    ),
    "misspelt_spec": (lambda t: ["--family", "llama", "--layout", "tp1", "--spec", "tee"], r"did you mean 'te'\?"),
    "misspelt_dtype": (lambda t: ["--family", "llama", "--layout", "tp1", "--dtype", "bf61"], r"did you mean 'bf16'\?"),
    "misspelt_layout_key": (
        lambda t: ["--family", "llama", "--layout", "tq=2"],
        r"'tq' is not a layout key \(did you mean 'tp'\?\).*'tp2-ep2'",
    ),
    "misspelt_engine": (lambda t: ["--family", "llama", "--layout", "tp1", "--serve", "vlm"], r"did you mean 'vllm'\?"),
    "selection_near_a_cell": (
        lambda t: ["--family", "llama", "--layout", "tp2", "-k", "llama.tp3"],
        r"-k 'llama.tp3' selects no cell of 1; did you mean 'llama.tp2'",
    ),
    # The layout as cell ids spell it: the near-miss names the cell, so the layout was read (nothing runs).
    "layout_in_the_id_form": (
        lambda t: ["--family", "qwen3_moe", "--layout", "tp2-sp-ep2", "-k", "qwen3_moe.tp2-sp-ep4"],
        r"did you mean 'qwen3_moe.tp2-sp-ep2'",
    ),
    "impossible_layout": (
        lambda t: ["--family", "llama", "--layout", "tp=3"],
        r"layout tp3 cannot shard llama: tp=3 does not divide 8 attention heads",
    ),
    "malformed_layout": (lambda t: ["--family", "llama", "--layout", "tp=two"], r"tp='two' is not an integer"),
    "unknown_layout_key": (lambda t: ["--family", "llama", "--layout", "cp=2"], r"cannot read layout 'cp=2'"),
    "sp_without_tp": (lambda t: ["--family", "llama", "--layout", "sp=1"], r"sp=1 needs tp > 1"),
    "dp_that_cannot_hold_experts": (
        lambda t: ["--family", "qwen3_moe", "--layout", "ep=2,dp=1"],
        r"dp=1 x tp=1 = 1 is not a multiple of ep=2 x etp=1 = 2",
    ),
    "unknown_adapter": (
        lambda t: ["--family", "llama", "--layout", "tp1", "--adapter", "ia3"],
        r"unknown adapter 'ia3'",
    ),
    "no_cell_selected": (lambda t: ["--family", "llama", "--layout", "tp1", "-k", "qwen"], r"selects no cell"),
    "keep_dir_is_a_file": (
        lambda t: ["--family", "llama", "--layout", "tp1", "--keep-dir", str(Path(__file__))],
        r"--keep-dir .* is a file, not a directory",
    ),
    "scale_family_on_cpu": (
        lambda t: ["--family", "qwen3_1p7b_shape", "--layout", "tp1", "--backend", "cpu"],
        r"qwen3_1p7b_shape is a scale family \(real widths, .*\): run them on a GPU",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_before_any_worker(case, tmp_path):
    make_args, message = CASES[case]
    code, error = compat_run(tmp_path, *make_args(tmp_path))
    assert code == 2, error
    assert re.search(message, error), error


def test_missing_package_exits_2(tmp_path):
    env = _stub_env(COMPAT_STUB_MISSING="peft")
    code, error = compat_run(tmp_path, "--family", "llama", "--layout", "tp1", env=env)
    assert code == 2
    assert "not installed: peft" in error and "make venv" in error, error


def test_bridge_too_old_for_save_hf_adapter_exits_2(tmp_path):
    env = _stub_env(COMPAT_STUB_VERSIONS="megatron-bridge=0.3.1")
    code, error = compat_run(tmp_path, "--family", "llama", "--layout", "tp1", env=env)
    assert code == 2
    assert "megatron-bridge 0.3.1 is too old: AutoBridge.save_hf_adapter" in error, error


def test_check_stack_in_process(monkeypatch):
    from compat.declare import versions

    real = versions.installed_versions()
    monkeypatch.setattr(versions, "installed_versions", lambda: {**real, "torch": None, "peft": None})
    with pytest.raises(versions.StackError, match=r"not installed: torch, peft"):
        versions.check_stack()
    monkeypatch.setattr(versions, "installed_versions", lambda: {**real, "megatron-bridge": "0.3.9"})
    with pytest.raises(versions.StackError, match=r"0\.3\.9 is too old.*first appears in 0\.4\.0"):
        versions.check_stack()


def test_output_defaults_to_results_json_and_bad_input_writes_none(tmp_path):
    """Without --output the run writes ./results.json; bad input leaves the directory as it was."""
    from compat.cli import _parser

    assert _parser().parse_args(["run", "--family", "llama", "--layout", "tp1"]).output == Path("results.json")
    code, error = compat_run(tmp_path, "--family", "lama", "--layout", "tp1", output=False)
    assert code == 2 and "did you mean 'llama'" in error, error
    assert not (tmp_path / "results.json").exists()
