"""Let multi-latent attention (MLA) use megatron-core's local core attention.

Upstream code this answers (megatron-core 0.19.2): ``MLASelfAttention`` builds its core
attention with ``k_channels`` and ``v_channels`` (``megatron/core/transformer/
multi_latent_attention.py:207-216``: query/key heads are ``qk_head_dim + qk_pos_emb_head_dim``
wide, value heads ``v_head_dim``). Only ``TEDotProductAttention`` takes them; the local
``DotProductAttention.__init__`` (``megatron/core/transformer/dot_product_attention.py:42``)
does not, and the bridge's DeepSeek block spec selects the local one when TE is absent
(``use_transformer_engine=HAVE_TE``). Its forward already follows the widths of the tensors it
is given (``baddbmm``/``bmm`` over the last dimension); only the output width,
``hidden_size_per_partition`` (``dot_product_attention.py:78``, from ``kv_channels``), must come
from ``v_channels``. The softmax scale is MLA's own, passed explicitly.

It changes only the local core attention (built by ``local`` cells alone); a call without the two
arguments is unchanged.
"""

from __future__ import annotations

__all__ = ["apply"]


def apply() -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    init = DotProductAttention.__init__

    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    DotProductAttention.__init__ = __init__
