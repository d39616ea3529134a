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

import time
from typing import Any

from compat import adapter_state, checkpoint
from compat.activations import megatron_forward
from compat.backends import Backend
from compat.cells import Cell
from compat.collective import Collective
from compat.export import MEGATRON_MERGED, MERGED_EXPORT, default_exporter, merged_export, merged_in_place
from compat.families import ensure_tiny_model, get_family
from compat.findings import CheckFailed
from compat.model_build import Built, build
from compat.paths import CellPaths
from compat.peft_compare import adapter_problems, compare_with_peft
from compat.plugins import Resolved

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

    def __call__(self, step: str) -> None:
        now = time.monotonic()
        self.seconds[step] = round(now - self._clock, 3)
        self._clock = now


def run_phase(
    cell: Cell, phase: str, paths: CellPaths, backend: Backend, comm: Collective, plugins: Resolved
) -> dict[str, Any]:
    """Run this rank's part of ``phase``; rank 0 returns the metrics of the comparison."""
    lap = _Laps()
    if comm.rank == 0:
        ensure_tiny_model(get_family(cell.family), paths.hf)
    comm.barrier()
    lap("hf model")
    built = build(cell, paths.hf, cell.load_layout if phase == "load" else cell.layout, backend)
    lap("build")
    saved, skipped_checks = None, {}
    if phase in ("roundtrip", "save"):
        saved = _fill(built, comm, SAVE_SEED)
        why = _save(built, paths, comm, plugins)
        if why:
            skipped_checks["checkpoint contents"] = why
        lap("fill, save, check checkpoint")
        if phase == "save":
            _export(built, paths, comm, plugins, reference=True)
            return {}
    _load(built, paths, comm, plugins, saved)
    lap("load, verify")
    vocab = get_family(cell.family).dims.vocab_size
    megatron_forward(built.model, backend, built.hidden_size, vocab, paths, "adapter")
    comm.barrier()
    lap("forward")
    _export(built, paths, comm, plugins, reference=False)
    lap("export")
    skipped = _merged(cell, built, paths, backend, comm, vocab, reference=phase == "load")
    lap("merged forms")
    if comm.rank != 0:
        return {}
    extra = {"skipped_checks": skipped_checks} if skipped_checks else {}
    try:
        metrics = compare_with_peft(cell, paths, phase == "load", skipped, backend.device)
    except CheckFailed as exc:
        lap("hf side")
        raise CheckFailed(exc.reason, {**exc.metrics, **extra, "seconds_by_step": lap.seconds}) from exc
    lap("hf side")
    return {**metrics, **extra, "seconds_by_step": lap.seconds}


def _fill(built: Built, comm: Collective, seed: int) -> dict[str, Any]:
    """Seeded adapter values; the cell fails on every rank if the bridge adapted nothing anywhere."""
    values = adapter_state.fill(built.model, seed)
    if sum(comm.gather(len(values))) == 0:
        comm.agree([f"the bridge applied no adapter to any of {list(built.peft.target_modules)}"])
    return values


def _save(built: Built, paths: CellPaths, comm: Collective, plugins: Resolved) -> str | None:
    """Save through the saver, then check what a dist checkpoint holds against the filter's keys.

    Returns why the contents check was skipped (a saver of another format), or None.
    """
    if comm.rank == 0:
        paths.checkpoint.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    plugins.saver(built.bridge, built.model, built.peft, paths.checkpoint)
    comm.barrier()
    wanted = {s for shards in comm.gather(checkpoint.adapter_shards(built.model)) for s in shards}
    if not checkpoint.is_dist_checkpoint(paths.checkpoint):
        return "the saver wrote no Megatron dist checkpoint: its contents are judged by the reload alone"
    comm.agree(checkpoint.check_contents(paths.checkpoint, wanted) if comm.rank == 0 else [])
    return None


def _load(built: Built, paths: CellPaths, comm: Collective, plugins: Resolved, saved: dict[str, Any] | None) -> None:
    """Overwrite the adapters with other values, load the checkpoint, and check what came back."""
    other = adapter_state.fill(built.model, OTHER_SEED)
    base_before = adapter_state.snapshot(adapter_state.base_params(built.model))
    if saved is not None:
        same = [k for k in other if k in saved and other[k].equal(saved[k])]
        comm.agree([f"the adapter {k} holds the saved values before the load" for k in same[:3]])
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        plugins.loader(built.bridge, built.model, built.peft, paths.checkpoint)
        problems = []
    except (Exception, CheckpointException) as exc:  # a checkpoint that does not load fails every rank's check
        problems = [checkpoint.unloadable(paths.checkpoint, exc)]
    comm.agree(problems)
    problems = adapter_state.compare_values(
        adapter_state.base_params(built.model), base_before, "base weight changed by adapter load:"
    )
    adapters = adapter_state.adapter_params(built.model)
    if saved is not None:
        problems += adapter_state.compare_values(adapters, saved, "adapter not restored:")
    else:
        problems += [
            f"adapter {k} still holds the fresh model's values after load"
            for k, p in adapters.items()
            if p.detach().cpu().equal(other[k])
        ][:3]
    comm.agree(problems)
    if plugins.checks_bridge_loader:
        _check_bridge_loader(built, paths, comm)


def _check_bridge_loader(built: Built, paths: CellPaths, comm: Collective) -> None:
    """The bridge's own loader (0.5+) must restore exactly what the first load restored."""
    from compat import bridge_api

    if not bridge_api.has_load_peft_adapter_checkpoint():
        return
    restored = adapter_state.snapshot(adapter_state.adapter_params(built.model))
    adapter_state.fill(built.model, OTHER_SEED)
    try:
        bridge_api.load_peft_adapter_checkpoint(built.model, paths.checkpoint, built.peft)
        problems = adapter_state.compare_values(
            adapter_state.adapter_params(built.model), restored, "load_peft_adapter_checkpoint:"
        )
    except Exception as exc:  # its failure is a finding, reported on every rank alike
        from compat.upstream import describe

        problems = [f"load_peft_adapter_checkpoint raised {describe(exc)}"]
    comm.agree(problems)


def _export(built: Built, paths: CellPaths, comm: Collective, plugins: Resolved, reference: bool) -> None:
    target = paths.reference_adapter if reference else paths.adapter
    plugins.exporter(built.bridge, built.model, built.peft, target, paths.hf)
    comm.barrier()


def _merged(
    cell: Cell, built: Built, paths: CellPaths, backend: Backend, comm: Collective, vocab: int, reference: bool
) -> dict[str, str]:
    """Produce the merged forms on the Megatron side; return those skipped, with why."""
    problems = lambda: adapter_problems(cell, paths, reference)  # noqa: E731 (read only if a merge raises)
    skipped: dict[str, str] = {}
    if hasattr(built.peft, "disable_adapter_layers") and hasattr(built.peft, "enable_adapter_layers"):
        # The base model alone, for telling a conversion mismatch from an adapter one.
        built.peft.disable_adapter_layers(built.model)
        megatron_forward(built.model, backend, built.hidden_size, vocab, paths, "base")
        built.peft.enable_adapter_layers(built.model)
        comm.barrier()
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
