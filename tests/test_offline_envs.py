"""Pinned environments on a machine without PyPI (the GPU image): what the gate's environment sees below
its pins, engine pins on the interpreter's own torch (``system_torch``), and the gate's accepted
results kept per device. The offline build itself (``PIP_NO_INDEX=1 PIP_FIND_LINKS``) is shown by
``scripts/check-offline-envs`` (it needs downloaded wheels, not a unit test's budget)."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

import pytest

from compat.declare.pin_sets import GateError, shared_paths
from compat.serving.engines import ensure_engine_env, load_engine_pins

REPO = Path(__file__).resolve().parents[1]
ENGINE = 'engine = "vllm"\ndevice = "cuda"\ndtypes = ["bf16"]\n[tolerance]\nbf16 = { atol = 5e-2, why = "x" }\n'


def test_the_callers_pythonpath_sites_are_shared_below_the_pins(monkeypatch, tmp_path) -> None:
    """The caller's PYTHONPATH folders (the GPU image's /tmp/site: TE, megatron's dependencies) are shared
    with a gate environment below its pins, since every build and run drops PYTHONPATH itself."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join((str(REPO), str(site))))
    assert shared_paths()[0] == str(site)  # before the interpreter's site-packages, as PYTHONPATH is
    assert str(REPO) not in shared_paths()  # the run puts the harness first itself
    assert str(site) not in shared_paths(caller=False)  # a serving engine sees the image alone


def test_the_gate_run_does_not_put_the_callers_sites_above_the_pins(monkeypatch, tmp_path) -> None:
    """The gate's run has the harness alone on PYTHONPATH, so a site folder's megatron-core (0.19.2) cannot
    shadow the pin set's own (0.17.1)."""
    import subprocess

    from compat.commands import gate
    from tests.test_gate import _cell, _gate_with

    seen = {}

    class Spy:  # takes the fake run that _gate_with installs, and notes the environment it is given
        CompletedProcess, run = subprocess.CompletedProcess, None

        def __setattr__(self, name, fake):
            object.__setattr__(self, name, lambda cmd, **kw: (seen.update(env=kw["env"]), fake(cmd, **kw))[1])

    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.setattr(gate, "subprocess", Spy())
    assert _gate_with(monkeypatch, tmp_path, {"cells": [_cell("a")]}, None) == 0
    assert seen["env"]["PYTHONPATH"] == str(tmp_path / "repo")


def test_gpu_accepted_results_do_not_overwrite_the_cpu_ones(tmp_path, monkeypatch) -> None:
    import json

    from tests.test_gate import _cell, _gate_with

    device = tmp_path / "repo" / "matrix" / "pins" / "accepted" / "nvidia-h200x1-te"
    cpu = {"cells": [_cell("a")]}
    assert (
        _gate_with(monkeypatch, tmp_path, {"cells": [_cell("b")]}, cpu, "--accept", "--accepted-dir", str(device)) == 0
    )
    assert json.loads((device / "bridge-x.json").read_text())["cells"][0]["id"] == "b"
    cpu_file = tmp_path / "repo" / "matrix" / "pins" / "accepted" / "bridge-x.json"
    assert json.loads(cpu_file.read_text()) == cpu
    # and the comparison reads the device's: "a" accepted on CPU, not run here, is no regression there
    assert _gate_with(monkeypatch, tmp_path, {"cells": [_cell("b")]}, cpu, "--accepted-dir", str(device)) == 0
    assert _gate_with(monkeypatch, tmp_path, {"cells": [_cell("b")]}, cpu) == 1


@pytest.mark.parametrize(
    ("extra", "packages", "needle"),
    [
        ('system_torch = "yes"\n', "", "system_torch = 'yes'; give true or false"),
        ('system_torch = true\nrequirements = "requirements/vllm-cuda.txt"\n', "", "needs \\[packages\\] torch"),
        ("system_torch = true\n", 'torch = "2.11.0"\n', "a requirements file listing every other wheel"),
    ],
)
def test_system_torch_pins_are_checked(tmp_path, extra, packages, needle) -> None:
    pins = tmp_path / "e.toml"
    pins.write_text(extra + ENGINE + f'[packages]\n{packages}[no-deps]\nvllm = "0.26.0"\n')
    with pytest.raises(GateError, match=needle):
        load_engine_pins(pins)


def test_the_committed_cuda_engine_runs_on_the_images_torch() -> None:
    pins = load_engine_pins(REPO / "matrix" / "serving" / "vllm-cuda.toml")
    assert pins.system_torch and pins.packages == {"torch": "2.11.0"} and pins.no_deps == {"vllm": "0.26.0"}
    listed = [ln for ln in pins.requirements.read_text().splitlines() if "==" in ln]
    # the 100 wheels beside vllm that ran (FIELD-NOTES), and the cutlass cu13 libraries vLLM lacked here
    assert len(listed) == 101 and not any(ln.startswith(("torch==", "vllm==")) for ln in listed)


def test_another_torch_is_refused_before_a_build(tmp_path) -> None:
    pins = tmp_path / "e.toml"
    reqs = tmp_path / "r.txt"
    reqs.write_text("")
    pins.write_text(
        f'system_torch = true\nrequirements = "{reqs}"\n'
        + ENGINE
        + '[packages]\ntorch = "0.0.1"\n[no-deps]\nvllm = "0.26.0"\n'
    )
    with pytest.raises(GateError, match=f"pins torch 0.0.1, this interpreter has torch {version('torch')}"):
        ensure_engine_env(load_engine_pins(pins), tmp_path / "gate")
    assert not (tmp_path / "gate" / "e").exists()
