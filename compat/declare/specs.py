"""Layer specs: what the Megatron model of a cell is built from.

- ``local``: megatron-core's own layers (SequentialMLP experts), no Transformer Engine: runs
  anywhere, CPU included, and is what the CPU matrix covers.
- ``te``: the bridge's own choice, Transformer Engine layers and, for MoE, grouped-GEMM experts
  (TEGroupedMLP): what production training on GPUs runs, and the bridge code behind it (LoRA
  around TE linears, grouped-expert adapters and their EP gather).

:func:`unavailable` says, without importing anything heavy, why a spec cannot run here, so such a
cell is ``unsupported`` before any rank starts. What a spec does to the bridge's provider is rank-side
(``compat.rank.provider_spec``): a declaration imports nothing it declares.
"""

from __future__ import annotations

import importlib.util

__all__ = ["DEFAULT_SPEC", "SPECS", "unavailable"]

SPECS = ("local", "te")
DEFAULT_SPEC = "local"


def unavailable(spec: str, backend: str) -> str | None:
    """Why ``spec`` cannot run on ``backend`` here, or None."""
    if spec != "te":
        return None
    if backend != "cuda":
        return "the te spec runs Transformer Engine kernels, which need a CUDA GPU (this cell ran on the CPU backend)"
    if importlib.util.find_spec("transformer_engine") is None:
        return "the te spec needs Transformer Engine, which is not installed here (docs/how-to/run-on-gpus.md)"
    return None
