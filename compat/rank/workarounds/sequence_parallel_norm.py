"""Let megatron-core's local norm run under sequence parallelism, as its fused (APEX) norm does.

Upstream code this answers (megatron-core 0.19.2): ``megatron/core/transformer/torch_norm.py:50``,
``WrappedTorchNorm`` (the norm of the local, non-TE layer spec without APEX) asserts
``not config.sequence_parallel``. A norm acts on each token alone, so a sequence-sharded input
needs nothing of it in the forward; what SP asks of a norm is that its weights' gradients be
summed over the TP group, which Megatron does for parameters marked ``sequence_parallel``, the
mark the fused norm sets (``megatron/core/fusions/fused_layer_norm.py:116-120``). Here the torch
norm is built with the assertion passed and its weights marked the same way.

It changes only megatron-core's local norm (built by ``local`` cells alone), and nothing for a config
without ``sequence_parallel``: every other assertion of ``WrappedTorchNorm`` still runs.
"""

from __future__ import annotations

__all__ = ["apply"]


def apply() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    build = WrappedTorchNorm.__new__

    def new(cls, config, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not config.sequence_parallel:
            return build(cls, config, *args, **kwargs)
        config.sequence_parallel = False  # let the remaining assertions run
        try:
            norm = build(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = new
