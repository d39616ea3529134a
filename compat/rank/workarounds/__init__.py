"""Workarounds for upstream code, one module per concern, each applied only where it is needed.

- ``transformer_engine``: megatron-bridge imports Transformer Engine unconditionally in some
  modules (which ones differs by release); applied only when TE is not importable.
- ``local_spec``: the layer spec of ``local`` cells, where the bridge asks for TE (used by
  ``compat.declare.specs`` for those cells alone).
- ``zero_centered_norm``: megatron-core's local norm refuses the (1 + w) norms of Gemma and
  Nemotron that only TE implements; changes only the local norm, so only ``local`` cells.
- ``sequence_parallel_norm``: megatron-core's local norm refuses sequence parallelism, which only its
  fused (APEX) and TE norms accept; changes only the local norm under SP, so only ``local`` cells.
- ``mla_core_attention``: multi-latent attention passes key/value head widths that only TE's core
  attention accepts; changes only the local core attention, so only ``local`` cells.
- ``sync_save``: a synchronous dist-checkpoint save starts a process for asynchronous writers'
  results; applied on every backend, to synchronous saves only.
- ``cpu``: megatron-core assumes CUDA in a few places; applied only by the CPU backend.

Workers call :func:`apply` once, before importing megatron.bridge. Nothing here is applied in
the caller's process.
"""

from __future__ import annotations

__all__ = ["apply"]


_applied: dict[str, list[str]] = {}


def apply(backend: str) -> list[str]:
    """Apply what this process needs for ``backend`` (once: a forked rank inherits the server's)."""
    if backend in _applied:
        return _applied[backend]
    from compat.rank.workarounds import (
        cpu,
        mla_core_attention,
        sequence_parallel_norm,
        sync_save,
        transformer_engine,
        zero_centered_norm,
    )

    applied = []
    if transformer_engine.needed():
        transformer_engine.apply()
        applied.append("transformer_engine")
    # Local-spec classes only (te cells build TE's norm and core attention): needed by local cells
    # whether or not TE is installed, and a rank may build both kinds.
    zero_centered_norm.apply()
    sequence_parallel_norm.apply()
    mla_core_attention.apply()
    sync_save.apply()
    applied += ["zero_centered_norm", "sequence_parallel_norm", "mla_core_attention", "sync_save"]
    if backend == "cpu":
        cpu.apply()
        applied.append("cpu")
    _applied[backend] = applied
    return applied
