"""verl's ``MegatronCheckpointManager`` as the harness's saver, exporter and loader; no verl logic here.

The manager is built from the harness's bridge, model and PEFT objects the way verl's Megatron
engine builds it (``verl/workers/engine/megatron/transformer_impl.py:614-648``), with
``save_contents=["model"]`` and no optimizer: a LoRA run's adapter-only checkpoint. One
``save_checkpoint`` writes both verl layouts (``verl/utils/megatron_utils.py:1060, :1081``): the
PEFT-filtered dist checkpoint in ``<dir>/model/dist_ckpt`` and, through
``bridge.save_hf_adapter``, the HF PEFT adapter in ``<dir>/model/huggingface/adapter``. The saver
and exporter return the directory the harness should check; the loader is verl's resume path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINT", "export", "load", "manager", "save"]

# verl's checkpoint config for a LoRA run resumed from its adapter: the model only, no optimizer.
CHECKPOINT = {"save_contents": ["model"], "load_contents": ["model"], "async_save": False}


def manager(bridge: Any, model: list, peft: Any) -> Any:
    """A ``MegatronCheckpointManager`` for this rank's model chunks, as verl's engine constructs it."""
    from megatron.core.utils import get_model_config
    from omegaconf import OmegaConf
    from verl.utils.checkpoint.megatron_checkpoint_manager import MegatronCheckpointManager

    hf = bridge.hf_pretrained
    hf_config = hf.config
    chunk = getattr(model[0], "module", model[0])
    return MegatronCheckpointManager(
        config=OmegaConf.create({"model": {"path": str(hf.model_name_or_path)}}),
        checkpoint_config=OmegaConf.create(CHECKPOINT),
        model_config=hf_config,
        transformer_config=get_model_config(model[0]),
        role="actor",
        model=model,
        arch=hf_config.architectures[0],
        hf_config=hf_config,
        param_dtype=next(chunk.parameters()).dtype,
        share_embeddings_and_output_weights=getattr(chunk, "share_embeddings_and_output_weights", False),
        processing_class=None,
        optimizer=None,
        optimizer_scheduler=None,
        use_distributed_optimizer=False,
        bridge=bridge,
        provider=bridge.to_megatron_provider(load_weights=False),
        peft_cls=peft,
    )


def save(bridge: Any, model: list, peft: Any, path: Path) -> Path:
    """verl's ``save_checkpoint``; the adapter dist checkpoint is where verl puts it."""
    from verl.utils.megatron_utils import get_model_dist_checkpoint_path

    manager(bridge, model, peft).save_checkpoint(str(path), global_step=0)
    return Path(get_model_dist_checkpoint_path(str(path)))


def export(bridge: Any, model: list, peft: Any, path: Path, base: Path) -> Path:
    """The same ``save_checkpoint``: its HF PEFT adapter export is what serving loads."""
    from verl.utils.megatron_utils import get_hf_model_checkpoint_path

    manager(bridge, model, peft).save_checkpoint(str(path), global_step=0)
    return Path(get_hf_model_checkpoint_path(str(path))) / "adapter"


def load(bridge: Any, model: list, peft: Any, path: Path) -> None:
    """verl's ``load_checkpoint`` (trainer resume) from the directory ``save`` was given."""
    manager(bridge, model, peft).load_checkpoint(str(path))
