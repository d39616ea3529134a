"""verl's side of the memory sync, run by verl's pinned environment (``matrix/frameworks/verl.toml``):
``python compat/serving/verl_sync.py`` with a JSON list of verl's ``model.lora`` mappings on stdin.

It writes, as a JSON list on stdout, what verl's Megatron engine hands its rollout engine when LoRA is synced
unmerged (``lora.merge=False``): the config of verl's own ``build_peft_config_for_vllm``, called as
``MegatronEngine.get_per_tensor_param`` calls it, and where in verl's installed source each step of that
sync is (file:line), found in the files rather than written down, so a verl upgrade moves them. verl
renames nothing: the engine gets ``export_adapter_weights``' names and tensors as streamed. It imports
nothing of the harness.
"""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

# (module, text on the line, what the line does): the steps of verl's unmerged LoRA sync.
STEPS = (
    ("verl.workers.engine.megatron.transformer_impl", "build_peft_config_for_vllm(self.model_config.lora)",
     "the engine's config, from model.lora"),
    ("verl.workers.engine.megatron.transformer_impl", "self.bridge.export_adapter_weights(self.module)",
     "the adapter streamed on every rank"),
    ("verl.workers.rollout.vllm_rollout.utils", "lora_tensors=weights", "vLLM: a TensorLoRARequest of the stream"),
    ("verl.utils.vllm.utils", "PEFTHelper.from_dict(peft_config)", "vLLM: the config read by PEFTHelper"),
)  # fmt: skip


def _where(module: str, text: str) -> str:
    """``verl/x/y.py:123`` of the first line of ``module``'s file that holds ``text`` ("" if none does).
    The file is read, not imported: its package would import Megatron, Ray and vLLM."""
    spec = find_spec("verl")
    path = Path(spec.origin).parent.parent / f"{module.replace('.', '/')}.py" if spec and spec.origin else None
    if path is None or not path.is_file():
        return ""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if text in line:
            return f"{module.replace('.', '/')}.py:{number}"
    return ""


def _plain(value: Any) -> Any:
    """peft's enums (TaskType, PeftType) as their values: vLLM's and peft's configs take either."""
    return getattr(value, "value", value)


def main() -> int:
    import inspect
    from importlib.metadata import version

    from verl.utils.megatron_peft_utils import build_peft_config_for_vllm

    lines, first = inspect.getsourcelines(build_peft_config_for_vllm)
    where = {
        "verl": version("verl"),
        "function": f"verl/utils/megatron_peft_utils.py:{first}-{first + len(lines) - 1} (build_peft_config_for_vllm)",
        "steps": {what: _where(module, text) for module, text, what in STEPS},
    }
    out = [
        {"peft_config": {k: _plain(v) for k, v in build_peft_config_for_vllm(lora).items()}, **where}
        for lora in json.loads(sys.stdin.read())
    ]
    sys.stdout.write(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
