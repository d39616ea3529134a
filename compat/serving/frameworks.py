"""RL frameworks' rollout sync: each framework pinned in an environment of its own, and the config its
own code hands the rollout engine for an adapter (``matrix/frameworks/NAME.toml``).

```toml
about = "what this set is"
framework = "verl"
script = "compat/serving/verl_sync.py"   # run by the environment's python: lora mapping in, JSON out
[no-deps]                                 # exact versions, over the building interpreter's site-packages
verl = "0.9.1"
```
The environment is the version gate's kind (``compat.declare.pin_sets.build_env``): the pins ``--no-deps``
over the site-packages of the interpreter that built it (peft, torch), keyed by the pins alone, so a
gate's run of another bridge reuses the set instead of rebuilding it (verl's config depends on verl and
peft's enums only). That config is a pure function of the pins and the adapter's settings; the answer is
kept under ``.gate/NAME/configs/`` keyed by both (and the script): importing verl costs about 10 s, paid
once per set of pins rather than once per cell.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compat.checks.upstream import HARNESS_ROOT as REPO
from compat.declare.pin_sets import GateError, build_env, read_pins_file, shared_paths

__all__ = ["FrameworkPins", "ensure_framework_env", "framework_config", "framework_pins", "main"]

PINS_DIR = REPO / "matrix" / "frameworks"
GATE = REPO / ".gate"


@dataclass(frozen=True)
class FrameworkPins:
    name: str
    framework: str
    script: Path
    packages: dict[str, str]
    digest: str


def framework_pins(framework: str) -> FrameworkPins:
    """``matrix/frameworks/FRAMEWORK.toml``, checked; :class:`GateError` says what is wrong with it."""
    from packaging.version import InvalidVersion, Version

    path = PINS_DIR / f"{framework}.toml"
    raw, data = read_pins_file(path, "framework pins file")
    unknown = set(data) - {"about", "framework", "script", "no-deps"}
    if unknown:
        raise GateError(f"{path}: unknown keys {sorted(unknown)}; allowed: about, framework, script, [no-deps]")
    script = REPO / str(data.get("script", ""))
    if data.get("framework") != framework or not script.is_file():
        raise GateError(f"{path}: needs framework = {framework!r} and the script its environment runs")
    packages = {k: str(v) for k, v in data.get("no-deps", {}).items()}
    for name, v in packages.items():
        try:
            Version(v)
        except InvalidVersion:
            raise GateError(f"{path}: {name} = {v!r} is not an exact version") from None
    keyed = raw + sys.version.encode()  # not the caller's packages: a gate's run reuses the set main built
    return FrameworkPins(path.stem, framework, script, packages, hashlib.sha256(keyed).hexdigest()[:16])


def ensure_framework_env(pins: FrameworkPins, root: Path = GATE) -> tuple[Path, bool, float]:
    """(its python, whether it was reused, seconds): built once per pin set, under a file lock (cells
    that start together wait for one build)."""
    import fcntl

    steps = [["--no-deps", "--ignore-installed", *(f"{n}=={v}" for n, v in pins.packages.items())]]
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{pins.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shared = shared_paths(caller=False)  # this interpreter's site-packages, never a PYTHONPATH (a planted fault's)
        return build_env(pins.name, pins.digest, root / pins.name / "venv", steps, pins.packages, shared=shared)


def framework_config(framework: str, lora: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """What ``framework``'s own code hands its rollout engine for an adapter of these settings (its
    ``model.lora``): ``peft_config``, the function that built it and the steps of the sync, as file:line."""
    pins = framework_pins(framework)
    python, _, _ = ensure_framework_env(pins)
    given = json.dumps(lora, sort_keys=True)
    key = hashlib.sha256(f"{pins.digest}\n{pins.script.read_bytes().hex()}\n{given}".encode()).hexdigest()[:24]
    cached = GATE / pins.name / "configs" / f"{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    run = subprocess.run(
        [str(python), "-P", str(pins.script)], input=given, capture_output=True, text=True, env=env, timeout=timeout
    )
    if run.returncode != 0:
        raise GateError(f"{pins.name}'s {pins.script.name} exited {run.returncode}: {run.stderr[-1500:]}")
    out = json.loads(run.stdout)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(cached)
    return out


def main(argv: list[str]) -> int:
    """``python -m compat.serving.frameworks FRAMEWORK``: build (or reuse) its environment ahead of the
    memory cells (``make serving-env``)."""
    try:
        python, reused, seconds = ensure_framework_env(framework_pins(*argv))
    except (GateError, TypeError) as exc:
        print(f"error: {exc} (usage: python -m compat.serving.frameworks FRAMEWORK)", file=sys.stderr)
        return 2
    print(f"framework environment {'reused' if reused else 'built'} in {seconds:.1f} s: {python}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
