"""A cell's layer spec applied to the bridge's provider, in the rank (before ``finalize()``).

Rank-side half of ``compat.declare.specs`` (which only names the specs and says where they cannot run):
the local spec swaps in megatron-core's own layers through ``compat.rank.workarounds.local_spec`` and
turns off the fusions that need Transformer Engine; the te spec keeps the bridge's choice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TE_FUSIONS", "configure"]

# Provider fields for fusions that need Transformer Engine or CUDA kernels: off with the local spec.
TE_FUSIONS = (
    "gradient_accumulation_fusion",
    "apply_rope_fusion",
    "masked_softmax_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "persist_layer_norm",
    "cross_entropy_loss_fusion",
    "moe_grouped_gemm",
    "moe_permute_fusion",
    "moe_router_fusion",
    "moe_shared_expert_overlap",
)


def configure(spec: str, provider: Any, local_layer_spec: Any, dtype: str) -> None:
    """Set the provider's layer spec and fusions for ``spec`` (before ``finalize()``)."""
    if spec == "local":
        from compat.rank.workarounds.local_spec import layer_spec_without_te

        provider.transformer_layer_spec = layer_spec_without_te(
            provider.transformer_layer_spec, local_layer_spec, provider
        )
        for key in TE_FUSIONS:
            if hasattr(provider, key):
                setattr(provider, key, False)
        return
    # te: the bridge's own layer spec and fusions; grouped-GEMM experts for MoE, as in training.
    if getattr(provider, "num_moe_experts", None):
        provider.moe_grouped_gemm = True
    # Without APEX, TE-spec models fail to build with gradient_accumulation_fusion on
    # ("fused_weight_gradient_mlp_cuda module is not found"); it only matters for training.
    provider.gradient_accumulation_fusion = False
    if dtype == "fp32":
        # TE has no flash or fused attention kernels for fp32 (it falls back to unfused attention:
        # transformer_engine/pytorch/attention/dot_product_attention/utils.py, 2.20), so a provider
        # that forces one (Gemma, Gemma 3: attention_backend = flash) builds no attention in fp32.
        from megatron.core.transformer.enums import AttnBackend

        if getattr(provider, "attention_backend", None) in (AttnBackend.flash, AttnBackend.fused):
            provider.attention_backend = AttnBackend.auto
