"""A cell's layer spec applied to the bridge's provider, in the rank (before ``finalize()``).

Rank-side half of ``compat.declare.specs`` (which only names the specs and says where they cannot run):
the local spec swaps in megatron-core's own layers through ``compat.rank.workarounds.local_spec`` and
turns off the fusions that need Transformer Engine; the te spec keeps the bridge's choice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FLASH_PACKAGES", "TE_FUSIONS", "configure"]

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
    from megatron.core.transformer.enums import AttnBackend

    forced = getattr(provider, "attention_backend", None)
    if dtype == "fp32":
        # TE has no flash or fused attention kernels for fp32 (it falls back to unfused attention:
        # transformer_engine/pytorch/attention/dot_product_attention/utils.py, 2.20), so a provider
        # that forces one (Gemma, Gemma 3: attention_backend = flash) builds no attention in fp32.
        if forced in (AttnBackend.flash, AttnBackend.fused):
            provider.attention_backend = AttnBackend.auto
    elif forced == AttnBackend.flash and not any(_importable(m) for m in FLASH_PACKAGES):
        # Megatron turns TE's other backends off when one is forced (NVTE_FUSED_ATTN=0, NVTE_UNFUSED_ATTN=0),
        # and TE's flash backend is the flash-attn package, which users of these providers install: here it
        # is missing, and TE would say only "No dot product attention backend is available".
        import inspect

        from compat.checks.findings import Unsupported
        from compat.checks.upstream import upstream_path

        where = upstream_path(inspect.getsourcefile(type(provider)) or "") or type(provider).__module__
        raise Unsupported(
            f"the bridge's {type(provider).__name__} ({where}) forces attention_backend=flash (Gemma's bridge sets it: "
            f"megatron/bridge/models/gemma/gemma_bridge.py) and Transformer Engine's flash backend needs the "
            f"flash-attn package ({' or '.join(FLASH_PACKAGES)}), which is not installed here; with flash forced, "
            "TE's fused (cuDNN) and unfused backends are off"
        )


# The packages Transformer Engine's FlashAttention backend imports (flash-attn 2, flash-attn 3).
FLASH_PACKAGES = ("flash_attn", "flash_attn_interface", "flash_attn_3")


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
