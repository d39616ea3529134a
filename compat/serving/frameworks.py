"""RL frameworks' rollout sync: each framework pinned in an environment of its own, and the config its
own code hands the rollout engine for an adapter (``matrix/frameworks/NAME.toml``).

```toml
about = "what this set is"
framework = "verl"
script = "compat/serving/verl_sync.py"   # run by the environment's python: lora mappings in, answers out (JSON)
[no-deps]                                 # exact versions, over the building interpreter's site-packages
verl = "0.9.1"
```
The environment is the version gate's kind (``compat.declare.pin_sets.build_env``): the pins ``--no-deps``
over the site-packages of the interpreter that built it (peft, torch), keyed by the pins and Python's
version, not by the calling environment, so a gate's run of another bridge reuses the set instead of
rebuilding it (verl's config depends on verl and
peft's enums only). That config is a pure function of the pins and the adapter's settings; each answer is
kept under ``.gate/NAME/configs/`` keyed by both (and the script): importing verl costs 10-20 s, paid once
per set of pins (``--answers``: every declared adapter kind in one process) rather than once per cell, and
the answers can be carried to a machine that cannot install the framework.
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
from compat.declare.adapters import Adapter, adapters
from compat.declare.pin_sets import GateError, build_env, read_pins_file, shared_paths

__all__ = [
    "FrameworkPins",
    "ensure_framework_env",
    "framework_config",
    "framework_configs",
    "framework_pins",
    "main",
    "verl_lora",
]

PINS_DIR = REPO / "matrix" / "frameworks"
GATE = REPO / ".gate"


@dataclass(frozen=True)
class FrameworkPins:
    name: str
    framework: str
    script: Path
    packages: dict[str, str]
    digest: str  # of the pins and the interpreter: the environment
    answers: str  # of the pins alone: what the framework's code answers does not depend on the interpreter


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
    digest, answers = (hashlib.sha256(b).hexdigest()[:16] for b in (keyed, raw))
    return FrameworkPins(path.stem, framework, script, packages, digest, answers)


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


def framework_config(framework: str, lora: dict[str, Any]) -> dict[str, Any]:
    """What ``framework``'s own code hands its rollout engine for an adapter of these settings (its
    ``model.lora``): ``peft_config``, the function that built it and the steps of the sync, as file:line."""
    return framework_configs(framework, [lora])[0]


def framework_configs(framework: str, loras: list[dict[str, Any]], timeout: float = 300.0) -> list[dict[str, Any]]:
    """``framework_config`` of each mapping; those not kept yet asked of the framework in one process."""
    pins = framework_pins(framework)
    given = [json.dumps(lora, sort_keys=True) for lora in loras]
    script = pins.script.read_bytes().hex()
    kept = [
        GATE / pins.name / "configs" / f"{hashlib.sha256(f'{pins.answers}{script}{g}'.encode()).hexdigest()[:24]}.json"
        for g in given
    ]
    missing = [i for i, path in enumerate(kept) if not path.is_file()]  # a carried answer counts (a GPU offline)
    if missing:
        python, _, _ = ensure_framework_env(pins)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        asked = "[" + ",".join(given[i] for i in missing) + "]"
        cmd = [str(python), "-P", str(pins.script)]
        run = subprocess.run(cmd, input=asked, capture_output=True, text=True, env=env, timeout=timeout)
        if run.returncode != 0:
            raise GateError(f"{pins.name}'s {pins.script.name} exited {run.returncode}: {run.stderr[-1500:]}")
        for i, answer in zip(missing, json.loads(run.stdout), strict=True):
            kept[i].parent.mkdir(parents=True, exist_ok=True)
            tmp = kept[i].with_name(f".{kept[i].name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(answer, indent=1))
            tmp.replace(kept[i])
    return [json.loads(path.read_text()) for path in kept]


def verl_lora(adapter: Adapter) -> dict[str, Any]:
    """verl's ``model.lora`` for an adapter kind (verl/trainer/config/model/hf_model.yaml): the mapping its
    Megatron engine gives ``megatron.bridge.peft.utils.create_peft`` and ``build_peft_config_for_vllm``."""
    return {
        "type": adapter.peft,
        "merge": False,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "dropout": adapter.dropout,
        "target_modules": list(adapter.targets),
        **dict(adapter.options),
    }


def main(argv: list[str]) -> int:
    """``python -m compat.serving.frameworks FRAMEWORK [--answers]``: build (or reuse) its environment ahead
    of the memory cells (``make serving-env``); with ``--answers``, also its config for every declared adapter
    kind, kept under ``.gate/NAME/configs/`` for a machine that cannot build the environment."""
    usage = "usage: python -m compat.serving.frameworks FRAMEWORK [--answers]"
    try:
        pins = framework_pins(argv[0])
        python, reused, seconds = ensure_framework_env(pins)
        print(f"framework environment {'reused' if reused else 'built'} in {seconds:.1f} s: {python}")
        if argv[1:] == ["--answers"]:
            kinds = adapters()
            framework_configs(pins.framework, [verl_lora(kind) for kind in kinds.values()])
            print(f"{pins.framework}'s config for {len(kinds)} adapter kinds in {GATE / pins.name / 'configs'}")
    except (GateError, IndexError) as exc:
        print(f"error: {exc} ({usage})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
