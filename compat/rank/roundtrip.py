"""The adapter round trip, as each rank of a cell runs it: the sequence of phases, and nothing else.

bridge -> model at the save layout with LoRA -> seeded non-zero adapter values -> adapter-only
checkpoint (saver) -> other values -> checkpoint loaded back (loader), bit-exact, base untouched ->
Megatron forward -> HF PEFT export (exporter) -> merged forms -> rank 0: the export as ``peft``
loads it against Megatron's logits.

A cell that reshards runs two launches: ``save`` at the save layout (which also exports the
reference the load must reproduce), then ``load`` at the load layout. Every other cell runs one
``roundtrip`` launch, which loads into the model it saved from, after overwriting its adapters.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from compat.checks.findings import CheckFailed
from compat.checks.problems import Problem
from compat.declare.cells import Cell
from compat.declare.families import base_device_kind, ensure_tiny_model, get_family, require_model_type
from compat.declare.plugins import Resolved
from compat.rank import adapter_state, checkpoint, delta_oracle, forward_oracle, memory_sync
from compat.rank.activations import megatron_forward
from compat.rank.adapted_weights import adapted_weights, unjudged_wrappers
from compat.rank.backends import Backend
from compat.rank.collective import Collective
from compat.rank.export import MEGATRON_MERGED, MERGED_EXPORT, default_exporter, merged_export, merged_in_place
from compat.rank.model_build import Built, build
from compat.rank.paths import CellPaths, write_json_atomic
from compat.rank.peft_compare import adapter_problems, compare_with_peft

__all__ = ["DEFAULT_PLUGINS", "OTHER_SEED", "SAVE_SEED", "run_phase"]

SAVE_SEED, OTHER_SEED = 1, 2

# The bridge's own calls: what a role takes when the run names no plugin for it (Plugins.resolve).
DEFAULT_PLUGINS = {
    "exporter": default_exporter,
    "saver": checkpoint.default_saver,
    "loader": checkpoint.default_loader,
}


class _Laps:
    """Seconds per step of a phase (``metrics.seconds_by_step``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._clock = time.monotonic()
        self.step = STEPS[0]  # the step under way

    def __call__(self, step: str) -> None:
        now = time.monotonic()
        self.seconds[step] = round(now - self._clock, 3)
        self._clock = now
        self.step = STEPS[min(STEPS.index(step) + 1, len(STEPS) - 1)]


def run_phase(
    cell: Cell, phase: str, paths: CellPaths, backend: Backend, comm: Collective, plugins: Resolved
) -> dict[str, Any]:
    """Run this rank's part of ``phase``; rank 0 returns the metrics of the comparison.

    A failed check is recorded and the phase goes on (``found``); only a check that leaves the
    later ones nothing to check raises, and the reason then names the steps that did not run.
    """
    lap = _Laps()
    found: list[Problem] = []
    try:
        metrics = _steps(cell, phase, paths, backend, comm, plugins, lap, found)
    except CheckFailed as exc:
        step = lap.step
        lap(step)
        later = [s for s in STEPS[STEPS.index(step) + 1 :] if phase != "save" or s in SAVE_STEPS]
        after = f" (after the {exc.problems[-1].check} check failed)"
        not_run = exc.not_run or (", ".join(later) + after if later else "")
        metrics = {**exc.metrics, "seconds_by_step": lap.seconds, **({"not_run": not_run} if not_run else {})}
        raise CheckFailed([*found, *exc.problems], metrics, not_run) from exc
    if found and comm.rank == 0:
        # Every rank holds the same ``found``; rank 0 alone reports it, after its HF side ran (a peer
        # failing first would be taken as the cause and rank 0 stopped mid-comparison).
        raise CheckFailed(found, metrics)
    return metrics


STEPS = ("hf model", "build", "fill, save, check checkpoint", "load, verify", "forward", "export", "memory sync",
         "delta oracle", "merged forms", "serving inputs", "hf side")  # fmt: skip
SAVE_STEPS = (*STEPS[:3], "export")


def _steps(
    cell: Cell,
    phase: str,
    paths: CellPaths,
    backend: Backend,
    comm: Collective,
    plugins: Resolved,
    lap: _Laps,
    found: list[Problem],
) -> dict[str, Any]:
    family = get_family(cell.family)
    require_model_type(family)  # on every rank: none waits at the barrier for rank 0
    if comm.rank == 0:
        on_gpu = base_device_kind(family, backend.name) != "cpu"
        ensure_tiny_model(family, paths.hf, device=str(backend.device) if on_gpu else "cpu")
    comm.barrier()
    lap("hf model")
    built = build(cell, paths.hf, cell.load_layout if phase == "load" else cell.layout, backend)
    lap("build")
    saved, skipped_checks = None, {}
    if phase in ("roundtrip", "save"):
        saved = _fill(built, comm, SAVE_SEED)
        why = _save(built, paths, comm, plugins, found)
        if why:
            skipped_checks["checkpoint contents"] = why
        lap("fill, save, check checkpoint")
        if phase == "save":
            _export(built, paths, comm, plugins, reference=True)
            return {}
    lap.step = "load, verify"
    why = _load(built, paths, comm, plugins, saved, found)
    if why:
        skipped_checks["bridge loader"] = why
    lap("load, verify")
    vocab = get_family(cell.family).dims.vocab_size
    weights = adapted_weights(built.bridge, built.model)  # the stored factors, as loaded
    with forward_oracle.recording(weights) as recorder:
        megatron_forward(built.model, backend, built.hidden_size, vocab, paths, "adapter")
    _judge_flight(cell, built, weights, recorder, paths, comm)
    _base_forward(built, paths, backend, comm, vocab)  # the base check's, and the memory sync's bound
    lap("forward")
    _export(built, paths, comm, plugins, reference=False)
    lap("export")
    if cell.sync == "memory":  # the adapter as an RL rollout takes it, before anything edits the model
        found += memory_sync.run(cell, built, paths, backend, comm)
        lap("memory sync")
    lap.step = "delta oracle"  # what a failure below is charged to, memory cell or not
    delta_oracle.run_oracle(built.bridge, weights, paths, comm, backend.device)
    comm.barrier()
    lap("delta oracle")
    merged_skipped = _merged(cell, built, paths, backend, comm, vocab, reference=phase == "load")
    lap("merged forms")
    if comm.rank != 0:
        return {}
    if cell.serve:  # what the serving engines' processes read (compat.serving), whatever peft says next
        from compat.serving import write_inputs

        write_inputs(cell, paths)
        lap("serving inputs")
    lap.step = "hf side"  # what a failure below is charged to, served or not
    try:
        metrics = compare_with_peft(cell, paths, phase == "load", merged_skipped, backend.device)
    except CheckFailed as exc:
        _skips(exc.metrics, skipped_checks, paths)["peak_memory"] = _peak_memory()
        raise
    lap("hf side")
    return {**_skips(metrics, skipped_checks, paths), "seconds_by_step": lap.seconds, "peak_memory": _peak_memory()}


def _skips(metrics: dict[str, Any], skipped_checks: dict[str, str], paths: CellPaths) -> dict[str, Any]:
    """The Megatron side's skipped checks joined to the HF side's, in ``metrics.skipped_checks``, what
    the user's plugins called (``metrics.plugin_calls``) and what a memory sync measured (``metrics.memory_sync``)."""
    both = {**skipped_checks, **metrics.get("skipped_checks", {})}
    if both:
        metrics["skipped_checks"] = both
    if paths.plugin_calls():
        metrics["plugin_calls"] = paths.plugin_calls()
    if paths.memory_sync.is_file():
        metrics["memory_sync"] = json.loads(paths.memory_sync.read_text())
    return metrics


def _peak_memory() -> dict[str, float]:
    """Rank 0's peak host memory (RSS) and GPU memory allocated by torch, in GiB."""
    import resource

    import torch

    out = {"host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _fill(built: Built, comm: Collective, seed: int) -> dict[str, Any]:
    """Seeded adapter values; the cell fails on every rank if the bridge adapted nothing anywhere."""
    values = adapter_state.fill(built.model, seed)
    if sum(comm.gather(len(values))) == 0:
        comm.agree([f"the bridge applied no adapter to any of {list(built.peft.target_modules)}"], "adapters applied")
    return values


def _save(built: Built, paths: CellPaths, comm: Collective, plugins: Resolved, found: list[Problem]) -> str | None:
    """Save through the saver, then check what a dist checkpoint holds against the filter's keys.

    Returns why the contents check was skipped (a saver of another format), or None.
    """
    if comm.rank == 0:
        paths.checkpoint.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    wrote, problems = plugins.call("saver", paths, built, paths.checkpoint)
    comm.agree(problems, "saver")
    wanted = {s for shards in comm.gather(checkpoint.adapter_shards(built.model)) for s in shards}
    if not checkpoint.is_dist_checkpoint(wrote):
        return "the saver wrote no Megatron dist checkpoint: its contents are judged by the reload alone"
    contents = checkpoint.check_contents(wrote, wanted) if comm.rank == 0 else []
    found += comm.collect(contents, "checkpoint contents")
    return None


def _load(
    built: Built,
    paths: CellPaths,
    comm: Collective,
    plugins: Resolved,
    saved: dict[str, Any] | None,
    found: list[Problem],
) -> str | None:
    """Overwrite the adapters with other values, load the checkpoint, and check what came back.

    A checkpoint that does not load leaves nothing to check after it; values it restored wrongly
    are recorded, and the export of what the model then holds is still checked. Returns why the
    bridge-loader check was skipped, or None.
    """
    other = adapter_state.fill(built.model, OTHER_SEED)
    base_before = adapter_state.snapshot(adapter_state.base_params(built.model))
    if saved is not None:
        same = [k for k in other if k in saved and other[k].equal(saved[k])]
        unchanged = [f"the adapter {k} holds the saved values before the load" for k in same[:3]]
        found += comm.collect(unchanged, "fresh values")
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    written = paths.where(paths.checkpoint)  # the saver's dist checkpoint, in this launch or the save launch
    try:
        plugins.call("loader", paths, built, paths.checkpoint)
        problems = []
    except (Exception, CheckpointException) as exc:  # a checkpoint that does not load fails every rank's check
        problems = [checkpoint.unloadable(written, exc)]
    comm.agree(problems, "checkpoint load")
    problems = adapter_state.compare_values(
        adapter_state.base_params(built.model), base_before, "base weight changed by adapter load:"
    )
    adapters = adapter_state.adapter_params(built.model)
    if saved is not None:
        problems += adapter_state.compare_values(adapters, saved, "adapter not restored:")
        wrong = [k for k, p in adapters.items() if k in saved and not p.detach().cpu().equal(saved[k])]
        if wrong and checkpoint.is_dist_checkpoint(written):
            problems += checkpoint.written_by(written, built.model, wrong[:1])
    else:
        problems += [
            f"adapter {k} still holds the fresh model's values after load"
            for k, p in adapters.items()
            if p.detach().cpu().equal(other[k])
        ][:3]
    found += comm.collect(problems, "values restored")
    if not checkpoint.is_dist_checkpoint(written):
        return "the loaded checkpoint is no Megatron dist checkpoint: the bridge's own loader cannot read it"
    return _check_bridge_loader(built, written, comm, found)  # whoever wrote it: the bridge's loader must read it


def _check_bridge_loader(built: Built, written: Path, comm: Collective, found: list[Problem]) -> str | None:
    """The bridge's own loader (0.5+) must restore exactly what the first load restored."""
    from compat.rank import bridge_api

    if not bridge_api.has_load_peft_adapter_checkpoint():
        return "this megatron-bridge has no load_peft_adapter_checkpoint"
    restored = adapter_state.snapshot(adapter_state.adapter_params(built.model))
    adapter_state.fill(built.model, OTHER_SEED)
    try:
        bridge_api.load_peft_adapter_checkpoint(built.model, written, built.peft)
        problems = adapter_state.compare_values(
            adapter_state.adapter_params(built.model), restored, "load_peft_adapter_checkpoint:"
        )
    except Exception as exc:  # its failure is a finding, reported on every rank alike
        from compat.checks.upstream import describe

        problems = [f"load_peft_adapter_checkpoint raised {describe(exc)}"]
    found += comm.collect(problems, "bridge loader")
    return None


def _export(built: Built, paths: CellPaths, comm: Collective, plugins: Resolved, reference: bool) -> None:
    target = paths.reference_adapter if reference else paths.adapter
    _, problems = plugins.call("exporter", paths, built, target, paths.hf)
    comm.barrier()
    comm.agree(problems, "exporter")


def _judge_flight(cell: Cell, built: Built, weights: list, recorder: Any, paths: CellPaths, comm: Collective) -> None:
    """The forward oracle's verdict on this rank's modules; rank 0 writes every rank's entries."""
    entries = forward_oracle.judge_weights(weights, recorder, cell.dtype)
    every = [e for rank_entries in comm.gather(entries) for e in rank_entries]
    unknown = {k: v for rank_unknown in comm.gather(unjudged_wrappers(built.model)) for k, v in rank_unknown.items()}
    if comm.rank == 0:
        write_json_atomic(paths.forward_oracle, {"entries": every, "unjudged_wrappers": unknown})


def _base_forward(built: Built, paths: CellPaths, backend: Backend, comm: Collective, vocab: int) -> None:
    """Megatron's base model alone (adapters off), for telling a conversion mismatch from an adapter one."""
    if hasattr(built.peft, "disable_adapter_layers") and hasattr(built.peft, "enable_adapter_layers"):
        built.peft.disable_adapter_layers(built.model)
        megatron_forward(built.model, backend, built.hidden_size, vocab, paths, "base")
        built.peft.enable_adapter_layers(built.model)
        comm.barrier()


def _merged(
    cell: Cell, built: Built, paths: CellPaths, backend: Backend, comm: Collective, vocab: int, reference: bool
) -> dict[str, str]:
    """Produce the merged forms on the Megatron side; return those skipped, with why."""
    problems = lambda: adapter_problems(cell, paths, reference)  # noqa: E731 (read only if a merge raises)
    skipped: dict[str, str] = {}
    why = merged_export(built.bridge, built.model, paths.merged, paths.hf, problems)
    comm.barrier()
    if why:
        skipped[MERGED_EXPORT] = why
    why = merged_in_place(built.model, built.peft, problems)
    if why:
        skipped[MEGATRON_MERGED] = why
    else:
        megatron_forward(built.model, backend, built.hidden_size, vocab, paths, "merged")
    comm.barrier()
    return skipped
