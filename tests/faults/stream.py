"""Faults only the memory sync has: the adapter stream a rollout receives differs from the file export.

``AutoBridge.export_adapter_weights`` runs twice in a memory cell: inside ``save_hf_adapter`` (the file
export) and as verl's rollout sync calls it (``compat.rank.memory_sync``). These wrappers edit only the
second call, on the ranks named, so the files stay right and only the memory checks can see the fault:
the stream losing its last tensor (verl's receiver applies the adapter after its last bucket), or one
rank streaming other values than the others (each rank feeds its own engine). A config fault of the
file against the stream is the file's own (``tamper.edit_config``), judged by the memory sync too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from faults import tamper
from faults.fault import Fault
from faults.tamper import Wrap

__all__ = ["STREAM_FAULTS"]

AUTO_BRIDGE = "megatron.bridge.models.conversion.auto_bridge"
_IN_FILE_EXPORT = [0]  # save_hf_adapter calls running in this process


def _file_export(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``AutoBridge.save_hf_adapter``: while it runs, ``export_adapter_weights`` is the file export's."""

    @functools.wraps(original)
    def save_hf_adapter(*args: Any, **kwargs: Any) -> Any:
        _IN_FILE_EXPORT[0] += 1
        try:
            return original(*args, **kwargs)
        finally:
            _IN_FILE_EXPORT[0] -= 1

    return save_hf_adapter


def _stream(fn: Callable[[dict[str, Any]], dict[str, Any]], ranks: tuple[int, ...] | None = None) -> Wrap:
    """Wrap ``export_adapter_weights``: ``fn`` edits {HF name: tensor} outside ``save_hf_adapter``, on ``ranks``."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        edited = tamper.transform_export(fn)(original)

        @functools.wraps(original)
        def export_adapter_weights(self: Any, *args: Any, **kwargs: Any) -> Any:
            mine = ranks is None or tamper._rank() in ranks
            use = edited if mine and not _IN_FILE_EXPORT[0] else original
            return use(self, *args, **kwargs)

        return export_adapter_weights

    return wrap


def _drop_last(w: dict[str, Any]) -> dict[str, Any]:
    """The stream ends one tensor early (layer 3's v_proj lora_B: the last the bridge streams, the fused QKV
    split last)."""
    return dict(list(w.items())[:-1])


def _patches(fn: Callable[[dict[str, Any]], dict[str, Any]], ranks: tuple[int, ...] | None = None) -> tuple:
    return (
        (AUTO_BRIDGE, "AutoBridge.save_hf_adapter", _file_export),
        (AUTO_BRIDGE, "AutoBridge.export_adapter_weights", _stream(fn, ranks)),
    )


_ALPHA_IN_FILE = tamper.after_adapter_saved(tamper.edit_config(lambda c: c.update(lora_alpha=32)))
MEMORY_LOGITS = r"peft built in memory from verl's tensors and config: its logits differ from Megatron's: mismatched"

STREAM_FAULTS = (
    Fault(
        "stream_tail_dropped",
        "the adapter stream verl takes loses its last tensor (the files are whole)",
        "llama",
        "tp1",
        _patches(_drop_last),
        (
            r"the stream as the bridge renames it lacks 1 tensors of the file export, e\.g\. "
            r"\['base_model\.model\.model\.layers\.3\.self_attn\.v_proj\.lora_B\.weight'\]",
            r"peft built in memory from verl's tensors and config: peft left the lora_B of 1 streamed modules "
            r"without a value \(the stream has none\), e\.g\. model\.layers\.\{3\}\.self_attn\.v_proj",
        ),
        fp32=(MEMORY_LOGITS,),
        sync="memory",
    ),
    Fault(
        "stream_differs_on_rank0",
        "rank 0's adapter stream has q and k rows swapped (layer 1); rank 1's and the files are right",
        "llama",
        "tp=2",
        _patches(tamper.swap_qk_rows, ranks=(0,)),
        (
            r"rank 1's adapter stream holds other values in 2 of rank 0's 56 tensors, e\.g\. "
            r"\['model\.layers\.1\.self_attn\.k_proj\.lora_B\.weight', 'model\.layers\.1\.self_attn\.q_proj\.lora_B",
            r"the stream as the bridge renames it differs from the file export in 2 tensors, e\.g\. "
            r"base_model\.model\.model\.layers\.1\.self_attn\.k_proj\.lora_B\.weight \(max \|diff\|",
        ),
        fp32=(MEMORY_LOGITS,),
        sync="memory",
    ),
    Fault(
        "config_file_vs_stream",
        "lora_alpha in adapter_config.json is 32 instead of 16, judged against the stream's configs",
        "llama",
        "tp1",
        ((AUTO_BRIDGE, "AutoBridge.save_hf_adapter", _ALPHA_IN_FILE),),
        (
            r"adapter_config\.json: lora_alpha is 32, expected 16",
            r"the bridge's config in memory differs from the file export's adapter_config\.json in 1 fields: "
            r"lora_alpha: 16, in the file 32",
            r"verl's config scales 28 of the 28 streamed modules by 2 \(r=8, lora_alpha=16\), the file export "
            r"by 4 \(r=8, lora_alpha=32\)",
        ),
        sync="memory",
    ),
)
