"""Give megatron-core's local norm the zero-centered gamma that only TENorm implements.

Upstream code this answers (megatron-core 0.19.2): ``megatron/core/transformer/torch_norm.py:44``,
``WrappedTorchNorm`` (the norm of the local, non-TE layer spec) asserts
``not config.layernorm_zero_centered_gamma``. The bridge's Gemma and Nemotron providers set it
(``megatron/bridge/models/gemma/gemma_provider.py:45``; Nemotron's LayerNorm1p), because their
HF checkpoints store ``w`` for a norm that scales by ``1 + w``. TE's norms add the 1 inside the
kernel; here the torch norm is built as usual and its forward scales by ``1 + w`` (RMSNorm as
``transformers``' ``GemmaRMSNorm``, LayerNorm as ``NemotronLayerNorm1P``).

It changes only megatron-core's local norm (built by ``local`` cells alone), and nothing for a config
without ``layernorm_zero_centered_gamma``: every other assertion of ``WrappedTorchNorm`` still runs.
"""

from __future__ import annotations

__all__ = ["apply"]


def apply() -> None:
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    class ZeroCenteredRMSNorm(torch.nn.RMSNorm):
        """RMSNorm scaling by ``1 + weight`` (TENorm with ``zero_centered_gamma``)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)

    class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
        """LayerNorm scaling by ``1 + weight`` (TENorm with ``zero_centered_gamma``)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)

    zero_centered = {torch.nn.RMSNorm: ZeroCenteredRMSNorm, torch.nn.LayerNorm: ZeroCenteredLayerNorm}
    build = WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not config.layernorm_zero_centered_gamma:
            return build(cls, config, hidden_size, eps, *args, **kwargs)
        config.layernorm_zero_centered_gamma = False  # let the remaining assertions run
        try:
            norm = build(cls, config, hidden_size, eps, *args, **kwargs)
        finally:
            config.layernorm_zero_centered_gamma = True
        if type(norm) not in zero_centered:
            raise AssertionError(f"zero_centered_gamma not supported for {type(norm).__name__} (compat workaround)")
        norm.__class__ = zero_centered[type(norm)]
        with torch.no_grad():
            norm.weight.zero_()  # identity at initialisation, as TENorm with zero_centered_gamma
        return norm

    WrappedTorchNorm.__new__ = new
