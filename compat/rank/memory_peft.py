"""Rank 0's consumer side of the memory sync: ``peft`` built from the streamed tensors and a config,
with no file, and its logits against Megatron's, as the file path judges ``PeftModel.from_pretrained``.

Two consumers are built from one stream: verl's (the tensors under the names ``export_adapter_weights``
gives them, verl's config, injected into the HF model: ``inject_adapter_in_model``), and the bridge's
(the tensors and config of ``convert_adapter_weights_to_peft_state`` and ``build_adapter_config_dict``,
in memory: ``get_peft_model``); both loaded by ``set_peft_model_state_dict``, peft's own loader behind
``from_pretrained``. A tensor peft finds no place for, a streamed module it leaves without a value, or
logits out of the file path's bound are problems. The bound is the file path's derivation
(``compat.checks.compare.adapter_tolerance``): the base models' drift measured in this cell (Megatron
with its adapters off, run in the cell's forward step), routing flips masked as there (``compat.rank.routing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from compat.checks.adapter_files import FileAdapter
from compat.checks.adapter_names import lora_module
from compat.checks.adapter_names import summarise as _summarise
from compat.checks.compare import (
    ADAPTER_GROWTH,
    Tolerance,
    adapter_tolerance,
    bounds_from_bases,
    compare,
    positions_problem,
    torch_dtype,
)
from compat.checks.oracles import flight_problems
from compat.checks.upstream import first_line, upstream_frame
from compat.declare.cells import Cell
from compat.declare.families import get_family
from compat.rank.activations import capture_hf, first_divergence, input_ids, load_megatron
from compat.rank.paths import CellPaths
from compat.rank.peft_compare import hf_model
from compat.rank.peft_oracle import PeftRecorder
from compat.rank.routing import capture_hf_routing, find_flips, hf_forward

__all__ = ["Consumer", "bound", "judge_consumer"]

_WHERE = ("sequence", "position", "token")


@dataclass(frozen=True)
class Consumer:
    """One way the stream reaches peft: its tensors (by name), its config, and how peft takes them."""

    who: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    wrapped: bool  # get_peft_model (names under base_model.model.), else inject_adapter_in_model


def bound(cell: Cell, paths: CellPaths, device: Any, metrics: dict[str, Any]) -> Tolerance:
    """The adapted logits' bound, derived as the file path derives it from the base drift measured here
    (``metrics["base_drift"]``)."""
    family = get_family(cell.family).dims
    hf = hf_model(paths.hf, torch_dtype(cell.dtype), device)
    base = hf_forward(hf, input_ids(family.vocab_size, device))
    meg = load_megatron(paths, "base", device)
    if "logits" not in meg:
        metrics["base_drift"] = None
        return adapter_tolerance(cell.dtype, None)
    flips = find_flips(meg, base, cell.dtype, family.hidden_size)
    keep = flips.keep() if flips is not None and flips.flips else None
    bounds = bounds_from_bases(cell.dtype, family.num_layers, family.hidden_size, meg["logits"], base["logits"], keep)
    metrics["base_drift"] = bounds.drift.max_abs_diff
    return bounds.adapted


def judge_consumer(
    cell: Cell, paths: CellPaths, consumer: Consumer, tol: Tolerance, device: Any
) -> tuple[list[str], dict[str, Any]]:
    """(problems, metrics) of peft built in memory by ``consumer``; the logits only where peft took it."""
    what = f"peft built in memory from {consumer.who}'s tensors and config"
    try:
        model, result = _build(cell, paths, consumer, device)
    except Exception as exc:  # peft refusing the tensors or the config is the finding
        why = f"{type(exc).__name__}: {first_line(exc, 600, lines=3)} at {upstream_frame(exc)}"
        return [f"{what}: peft refused them: {why}"], {"status": "refused", "max_abs_diff": None}
    problems = _placement(consumer, result, what)
    ids = input_ids(get_family(cell.family).dims.vocab_size, device)
    acts: dict[str, torch.Tensor] = {}
    hooks = capture_hf(model, acts) + capture_hf_routing(model, acts, ids)
    with torch.no_grad(), PeftRecorder(model) as in_flight:
        acts["logits"] = model(ids).logits
    for h in hooks:
        h.remove()
    # the forward oracle on the consumer's side: each LoRA layer against the streamed factors and this config
    flight = in_flight.judge(FileAdapter(consumer.config, consumer.tensors), cell.dtype)
    problems += [f"{what}: {p.message}" for p in flight_problems(flight, "in flight")]
    meg = load_megatron(paths, "adapter", device)
    dims = get_family(cell.family).dims
    flips = find_flips(meg, acts, cell.dtype, dims.hidden_size, ADAPTER_GROWTH)
    keep = flips.keep() if flips is not None and flips.flips else None
    c = compare(meg["logits"], acts["logits"], tol, keep)
    if not c.ok:
        where = first_divergence(meg, acts, tol)
        routed = f"; {flips.summary()}" if flips is not None and flips.flips else ""
        problems.append(
            c.message(f"{what}: its logits differ from Megatron's", _WHERE)
            + (f"; first divergence: {where}" if where else "")
            + routed
        )
    problems += [f"{what}: {p}" for p in (flips.problems() if flips is not None else [])]
    few = positions_problem(keep, what)
    problems += [few] if few else []
    judged = sum(1 for e in flight if e.get("judged"))
    return problems, {"status": "pass" if not problems else "fail", "max_abs_diff": c.max_abs_diff,
                      "in_flight_judged": judged}  # fmt: skip


def _build(cell: Cell, paths: CellPaths, consumer: Consumer, device: Any) -> tuple[Any, Any]:
    """The HF base model with the consumer's adapter, loaded from its tensors: (model, peft's load result)."""
    from peft import get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
    from peft.config import PeftConfig

    config = PeftConfig.from_peft_type(**consumer.config)
    hf = hf_model(paths.hf, torch_dtype(cell.dtype), device)
    model = get_peft_model(hf, config) if consumer.wrapped else inject_adapter_in_model(config, hf)
    result = set_peft_model_state_dict(model, consumer.tensors)
    return model.eval(), result


def _placement(consumer: Consumer, result: Any, what: str) -> list[str]:
    """Streamed tensors peft found no place for; streamed modules whose LoRA it left without a value.
    A module the config adapts but the stream does not carry keeps peft's initial B = 0: no effect."""
    problems = []
    streamed = {lora_module(k)[0] for k in consumer.tensors}
    dropped = sorted({lora_module(k)[0] for k in result.unexpected_keys})
    unset: dict[str, set[str]] = {}
    for key in result.missing_keys:
        module, kind = lora_module(key)
        if module in streamed:
            unset.setdefault(kind, set()).add(module)
    if dropped:
        problems.append(
            f"{what}: peft found no place for the tensors of {len(dropped)} modules, e.g. {_summarise(dropped)}"
        )
    for kind, modules in sorted(unset.items()):
        problems.append(
            f"{what}: peft left the {kind} of {len(modules)} streamed modules without a value (the stream has "
            f"none), e.g. {_summarise(sorted(modules))}"
        )
    return problems
