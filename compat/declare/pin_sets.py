"""Pinned environments: a venv built from exact pins by ``pip``, cached while its pins are unchanged.

The version gate (``compat.commands.gate``), a downstream's pin set (``examples/verl``) and the serving
engines (``compat.serving``) each build theirs here, so there is one builder and one cache format.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from compat.checks.upstream import HARNESS_ROOT

__all__ = ["GateError", "build_env", "read_pins_file", "shared_paths"]


class GateError(Exception):
    """Bad input for the gate, or an environment that could not be built: exit 2, with why."""


def read_pins_file(path: Path, what: str) -> tuple[bytes, dict[str, Any]]:
    """A pins file's bytes (its cache key) and its TOML; :class:`GateError` if it is missing or not TOML."""
    if not path.is_file():
        raise GateError(f"{what} {path} does not exist")
    raw = path.read_bytes()
    try:
        return raw, tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise GateError(f"{path}: not valid TOML: {exc}") from None


def shared_paths(*, caller: bool = True) -> list[str]:
    """What a shared environment sees below its own pins: the caller's ``PYTHONPATH`` folders (with
    ``caller``; the harness's root excepted: the run puts it first itself), then this interpreter's
    site-packages. ``PYTHONPATH`` is dropped from every build and run (``_clean_env``), so a site
    that arrives only through it (the GPU image's carried ``/tmp/site``: TE, megatron's dependencies)
    must be named here, below the pins, or the pinned environment lacks it."""
    own = {str(HARNESS_ROOT.resolve()), ""}
    paths = [
        p
        for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if caller and str(Path(p).resolve()) not in own and p
    ]
    paths += site.getsitepackages()
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        paths.append(site.getusersitepackages())
    return [p for p in paths if os.path.isdir(p)]


# ---------------------------------------------------------------- environment


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _gate_site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
    )
    purelib = Path(out.stdout.strip())
    if not purelib.is_relative_to(python.parent.parent):  # never write outside the gate venv
        raise GateError(f"the gate interpreter {python} reports site-packages {purelib} outside its venv")
    return purelib


def _installed(python: Path, names: list[str]) -> dict[str, str | None]:
    code = (
        "import json, sys\nfrom importlib import metadata\nout = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = metadata.version(n)\n"
        "    except metadata.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))"
    )
    out = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, env=_clean_env())
    if out.returncode != 0:
        raise GateError(f"the gate interpreter {python} does not start:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


def build_env(
    name: str, digest: str, venv: Path, steps: list[list[str]], want: dict[str, str], *, shared: list[str]
) -> tuple[Path, bool, float]:
    """A cached venv: reused while ``digest`` is unchanged, else built by ``pip install`` ``steps`` in
    order and checked against ``want`` (exact versions). ``shared``: the folders it sees below its own
    site-packages (``shared_paths()``: the gate; a serving engine on the image's torch); empty, it is
    on its own (a serving engine with a torch of its own). pip reads its index from its environment
    variables, which pass through: ``PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`` builds offline from carried
    wheels (``scripts/gpu-evidence`` on the device)."""
    start = time.monotonic()
    venv = venv.resolve()  # absolute: site-packages is checked to lie inside it
    stamp = venv / "gate-pins.sha256"
    python = _venv_python(venv)
    if stamp.is_file() and stamp.read_text().strip() == digest and python.exists():
        return python, True, time.monotonic() - start
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    step = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True)
    if step.returncode != 0:
        raise GateError(f"could not create {venv}:\n{step.stderr[-2000:]}")
    if shared:  # the shared packages come after the gate's own site-packages on sys.path, so pins shadow them
        (_gate_site_packages(python) / "_gate_shared.pth").write_text("\n".join(shared) + "\n")
        pip = [str(python), "-m", "pip"]
    else:  # no pip of its own: this interpreter's pip installs into it
        pip = [sys.executable, "-m", "pip", "--python", str(python)]
    for args in steps:
        print(f"gate: building {venv} for {name}: pip install {' '.join(args)}", flush=True)
        cmd = [*pip, "install", "--no-compile", "--disable-pip-version-check", *args]
        step = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
        if step.returncode != 0:
            raise GateError(
                f"could not build the environment for {name}: pip install {' '.join(args)} failed\n"
                + (step.stderr or step.stdout)[-3000:]
            )
    got = _installed(python, list(want))
    wrong = {n: v for n, v in got.items() if v != want[n]}
    if wrong:
        raise GateError(
            f"the environment for {name} does not resolve the pinned versions: "
            + ", ".join(f"{n} is {v} (pinned {want[n]})" for n, v in wrong.items())
        )
    stamp.write_text(digest + "\n")
    return python, False, time.monotonic() - start


# ---------------------------------------------------------------- command
