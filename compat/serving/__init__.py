"""Serving checks: the cell's export loaded by a serving engine as its users load it, and the engine's
full-vocab prompt log-probs compared with Megatron's, exactly as the peft check compares logits.

The engine runs in a process of its own pinned environment (``compat.serving.engines``: vLLM pins
its own torch), so the seam is files, in the cell's ``serve/`` directory:

- rank 0 writes ``inputs.safetensors`` (the token ids; log_softmax of Megatron's logits with the
  adapter and, where the bridge switches adapters off, without) and ``request.json`` (the HF base
  model and the export's directories, the dtype), right after the export: :func:`write_inputs`;
- the launcher runs ``compat/serving/ENGINE.py SERVE_DIR`` (one module per engine) with the engine
  environment's python; it writes ``ENGINE.safetensors`` (its log-probs without the adapter, with
  it, and with each module group alone) and ``ENGINE.json`` (what it refused, its version, timings);
- the launcher compares them into the cell's ``serving.ENGINE`` record: :func:`check`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from compat.checks.problems import Problem
from compat.declare.cells import Cell
from compat.rank.paths import CellPaths
from compat.serving.engines import ENGINES, EnginePins, engine_pins, ensure_engine_env

__all__ = ["ENGINES", "check", "check_servable", "fold", "problems", "write_inputs"]

_WHERE = ("sequence", "position", "token")


def serve_dir(root: Path) -> Path:
    return Path(root) / "serve"


def check_servable(cell: Cell, backend: str) -> None:
    """Bad input before anything starts: an engine with no pins for this device, a dtype it does not
    serve well enough to check, a head_dim its attention refuses, MoE LoRA where it has no kernels."""
    from compat.declare.families import get_family

    family = get_family(cell.family)
    for engine in cell.serve:
        pins = engine_pins(engine, "cuda" if backend == "cuda" else "cpu")
        if cell.dtype not in pins.dtypes:
            raise ValueError(f"cell {cell.id}: {pins.name} serves {'/'.join(pins.dtypes)} here, not {cell.dtype}")
        derived = family.dims.hidden_size // family.dims.num_attention_heads
        head_dim = family.config.get("head_dim", derived)
        if family.model_type in pins.derives_head_dim and head_dim != derived:
            raise ValueError(
                f"cell {cell.id}: {pins.name}'s {family.model_type} takes head_dim as hidden_size / "
                f"num_attention_heads = {derived}, not the config's {head_dim}: {pins.derives_head_dim_why}"
            )
        if pins.head_dims and head_dim not in pins.head_dims:
            raise ValueError(
                f"cell {cell.id}: {pins.name}'s attention refuses head_dim {head_dim} (takes {list(pins.head_dims)}); "
                f"serve a family of the serving profile (compat/data/families.toml), e.g. {cell.family}_serving"
            )
        if family.is_moe and not pins.moe_lora:
            raise ValueError(f"cell {cell.id}: {pins.name} has no MoE LoRA: {pins.moe_lora_why}")


def write_inputs(cell: Cell, paths: CellPaths) -> None:
    """Rank 0, after the export: what every engine's process reads (Megatron's side, in fp32)."""
    import torch
    from safetensors.torch import save_file

    from compat.declare.families import get_family
    from compat.rank.activations import input_ids, load_megatron
    from compat.rank.paths import write_json_atomic

    out = serve_dir(paths.root)
    out.mkdir(exist_ok=True)
    vocab = get_family(cell.family).dims.vocab_size
    tensors = {"ids": input_ids(vocab).contiguous()}
    for tag in ("adapter", "base"):
        logits = load_megatron(paths, tag).get("logits")
        if logits is not None:  # positions 0..T-2 predict the tokens an engine's prompt log-probs score
            tensors[tag] = torch.log_softmax(logits.double(), dim=-1)[:, :-1].float().contiguous()
    save_file(tensors, str(out / "inputs.safetensors"))
    request = {"base": str(paths.hf), "adapter": str(paths.adapter), "dtype": cell.dtype, "vocab_size": vocab}
    if (paths.memory / "stream.safetensors").is_file():  # a memory cell: also the stream, as verl hands it
        verl = json.loads((paths.memory / "verl.json").read_text())
        request["memory"] = {"tensors": str(paths.memory / "stream.safetensors"), "peft_config": verl["peft_config"]}
    write_json_atomic(out / "request.json", request)


def check(cell: Cell, root: Path, backend: str, timeout: float) -> dict[str, dict[str, Any]]:
    """``serving`` of the cell's result: per engine, status, max diff, effect and problems."""
    out = {}
    for engine in cell.serve:
        start = time.monotonic()
        try:
            record = _check(engine, cell, serve_dir(root), backend, timeout)
        except Exception as exc:  # a broken check is an error of the cell, never a crash of the run
            record = _record("error", [f"{type(exc).__name__}: {exc}"])
        record["seconds"] = {**record.get("seconds", {}), "total": round(time.monotonic() - start, 2)}
        out[engine] = record
    return out


def _record(status: str, problems: list[str], **metrics: Any) -> dict[str, Any]:
    return {"status": status, "max_abs_diff": None, "adapter_effect": None, **metrics, "problems": problems}


def _check(engine: str, cell: Cell, where: Path, backend: str, timeout: float) -> dict[str, Any]:
    if not (where / "request.json").is_file():
        return _record("error", ["the round trip stopped before the export: nothing to serve"])
    pins = engine_pins(engine, "cuda" if backend == "cuda" else "cpu")
    python, _, build_s = ensure_engine_env(pins)
    record = _run_engine(engine, python, where, timeout)
    record.setdefault("seconds", {})["environment"] = round(build_s, 2)
    if "error" in record:
        return _record("error", [f"{pins.name}: {record['error']}"], seconds=record.get("seconds", {}))
    return {**_compare(engine, cell, pins, where, record), "engine": record.get("engine", pins.name)}


def _run_engine(engine: str, python: Path, where: Path, timeout: float) -> dict[str, Any]:
    script = Path(__file__).with_name(f"{engine}.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    log = where / f"{engine}.log"
    cmd = [str(python), "-P", str(script), str(where)]  # -P: compat/serving (holding vllm.py) is not on sys.path
    # Engines on one GPU may start side by side: each takes a fixed KV cache (compat/serving/vllm.py,
    # KV_CACHE_BYTES), so none runs vLLM's memory profiling, which another process freeing memory trips.
    with log.open("w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
            how = f"exited {code}"
        except subprocess.TimeoutExpired:  # killed by subprocess.run
            how = f"did not finish within the cell's {timeout:.0f} s and was killed"
    result = where / f"{engine}.json"
    if not result.is_file():
        tail = log.read_text(errors="replace")[-2000:]
        return {"error": f"the {engine} process {how} without a result; its log ends:\n{tail}"}
    return json.loads(result.read_text())


def _compare(engine: str, cell: Cell, pins: EnginePins, where: Path, record: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    from compat.checks.compare import adapter_tolerance, compare, effect_problem

    tol = pins.tolerance(cell.dtype)
    megatron, served = load_file(str(where / "inputs.safetensors")), load_file(str(where / f"{engine}.safetensors"))
    refused = record.get("refused", {})
    if "adapter" in refused:
        return _record(
            "fail", [f"{engine} refused the export: {refused['adapter']}"], seconds=record.get("seconds", {})
        )
    problems = []
    if "base" in megatron:
        c = compare(served["base"], megatron["base"], tol)
        if not c.ok:
            problems.append(c.message(f"the base models differ before any adapter: {engine} vs Megatron", _WHERE))
        # the adapted log-probs: the peft check's derivation from the base drift measured here (log-probs
        # have no modelled drift; the pins' table is the floor)
        tol = adapter_tolerance(cell.dtype, c.max_abs_diff, table=tol, base_allowed=tol.atol)
    c = compare(served["adapter"], megatron["adapter"], tol)
    effect = float((served["adapter"].double() - served["base"].double()).abs().max())
    if not c.ok:
        problems.append(c.message(f"{engine} log-probs with the adapter differ from Megatron's", _WHERE))
        problems += _groups_not_applied(engine, record, served, tol)
    small = effect_problem(served["base"], served["adapter"], tol, engine)
    if small:
        problems.append(small)
    memory: dict[str, Any] = {}
    if "memory" in refused:
        problems.append(f"{engine} refused the adapter from memory (the stream, verl's config): {refused['memory']}")
    elif "memory" in served:
        m = compare(served["memory"], megatron["adapter"], tol)
        memory["memory_max_abs_diff"] = m.max_abs_diff
        if not m.ok:
            what = f"{engine} log-probs with the adapter from memory (the stream, verl's config) differ from Megatron's"
            problems.append(m.message(what, _WHERE))
    status = "fail" if problems else "pass"
    return _record(
        status,
        problems,
        max_abs_diff=c.max_abs_diff,
        adapter_effect=effect,
        seconds=record.get("seconds", {}),
        **memory,
    )


def _groups_not_applied(engine: str, record: dict[str, Any], served: dict[str, Any], tol: Any) -> list[str]:
    """Where a mismatch is located: module groups the engine loads (non-zero B) but does not apply."""
    from compat.checks.compare import compare

    out = []
    for group, info in record.get("groups", {}).items():
        key = f"only:{group}"
        if key in record.get("refused", {}):
            out.append(f"{engine} refused the adapter's {group} modules alone: {record['refused'][key]}")
        elif key in served and info["nonzero"] and compare(served[key], served["base"], tol).ok:
            out.append(
                f"{engine} loads the adapter's {group} modules ({', '.join(info['modules'])}) but they do not "
                "change its log-probs: not applied"
            )
    return out


def fold(status: str, reason: str, serving: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """The cell's status and reason with its serving checks: one that does not pass fails the cell (an
    error is an error), named ``serving.ENGINE``, so reports, expectations and the gate see it."""
    for engine, record in serving.items():
        if record["status"] == "pass":
            continue
        if status == "pass":
            status = record["status"]
        reason = "; ".join(p for p in (reason, f"serving.{engine}: " + "; ".join(record["problems"])) if p)
    return status, reason


def problems(serving: dict[str, dict[str, Any]]) -> list[Problem]:
    """The serving checks' problems as the cell's, each under its check ``serving.ENGINE``."""
    return [
        Problem(f"serving.{engine}", p) for engine, r in serving.items() if r["status"] != "pass" for p in r["problems"]
    ]
