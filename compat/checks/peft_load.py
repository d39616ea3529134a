"""What ``peft`` made of an exported adapter: where each tensor of the file landed when it loaded it.

``peft`` drops what it cannot place with at most a warning; these checks ask it (a second load of
the file, whose unexpected and missing keys it returns) and compare what it holds with the file,
through the fused experts transformers builds too (``compat.checks.fused_experts``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compat.checks.adapter_names import KEY, PREFIX, lora_module, summarise
from compat.checks.fused_experts import fused_expert_problems
from compat.checks.problems import Listed

__all__ = ["check_loaded_by_peft"]


def check_loaded_by_peft(peft_model: Any, path: Path) -> list[str]:
    """What ``peft`` did with the file: every tensor must land in a LoRA parameter, every LoRA parameter
    must get a value, and a module peft wrapped under the file's own name must hold the file's values.

    Placement is peft's own verdict: the file is loaded once more as a second adapter and
    ``load_adapter`` returns the keys it could not place (after transformers' and peft's conversions
    of fused experts and renamed modules) and the parameters it found no value for.
    """
    import torch
    from safetensors.torch import load_file

    problems = []
    result = peft_model.load_adapter(str(path), adapter_name=_CHECK)
    try:
        dropped = sorted({lora_module(k)[0] for k in result.unexpected_keys})
        unset = sorted({lora_module(k)[0] for k in result.missing_keys if f".{_CHECK}." in k})
    finally:
        peft_model.delete_adapter(_CHECK)
        peft_model.set_adapter("default")
    if dropped:
        config = peft_model.peft_config["default"]
        problems.append(
            Listed(
                f"peft applied no LoRA to {len(dropped)} modules that have tensors in the file, "
                f"e.g. {summarise(dropped)} (loaded config: target_modules "
                f"{sorted(config.target_modules or [])}, target_parameters {sorted(config.target_parameters or [])})",
                dropped,
            )
        )
    if unset:
        problems.append(
            Listed(
                f"peft found no value in the file for the LoRA of {len(unset)} modules (they keep their initial "
                f"values), e.g. {summarise(unset)}",
                unset,
            )
        )
    saved = load_file(str(path / "adapter_model.safetensors"))
    params = dict(peft_model.named_parameters())
    wrapped = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    differ: dict[str, str] = {}
    unseen: dict[str, str] = {}
    fused, seen = fused_expert_problems(peft_model, saved)
    lora_values: dict[tuple[int, ...], list[Any]] = {}  # the loaded adapter's LoRA values by shape, on the host once
    for n, p in params.items():
        if ".default." in n and (".lora_A." in n or ".lora_B." in n or "lora_magnitude_vector" in n):
            lora_values.setdefault(tuple(p.shape), []).append(p.detach().cpu())
    for key, value in saved.items():
        m = KEY.match(key)
        full = PREFIX + m["module"] if m else ""
        name = f"{full}.{m['kind'] or m['magnitude']}.default.weight" if m else ""
        if full in wrapped and name in params:
            if not torch.equal(params[name].detach().cpu().to(value.dtype), value):
                differ[key] = f"{key} (parameter {name})"
        elif key not in seen and not any(f"{lora_module(key)[0]}.".startswith(f"{d}.") for d in dropped):  # named above
            if not _held_elsewhere(value, lora_values):  # a module renamed on load (checkpoint -> model names)
                unseen[key] = (
                    f"{key} ({f'no parameter {name}' if m else 'not a LoRA tensor name'}, in no fused experts)"
                )
    if differ:
        problems.append(
            Listed(
                f"peft did not load {len(differ)} tensors of the file: the loaded values differ, "
                f"e.g. {'; '.join(list(differ.values())[:2])}",
                differ,
            )
        )
    if unseen:  # peft took them (they are not unexpected) somewhere no check can compare them
        problems.append(
            Listed(
                f"{len(unseen)} tensors of the file have no place a check can find in the model peft loaded, "
                f"e.g. {'; '.join(list(unseen.values())[:2])}",
                unseen,
            )
        )
    return [*problems, *fused]


_CHECK = "compat_check"


def _held_elsewhere(value: Any, lora_values: dict[tuple[int, ...], list[Any]]) -> bool:
    """Whether a LoRA parameter of the loaded adapter holds exactly the file tensor's values under another name:
    transformers renames checkpoint modules on load (HY-V3's mlp.shared_mlp is mlp.shared_experts in the model)
    and peft follows, so a tensor found nowhere by name can still be in place. The harness's adapter values are
    seeded per tensor, row and expert, so equal values are the same tensor."""
    import torch

    return any(torch.equal(p.to(value.dtype), value) for p in lora_values.get(tuple(value.shape), []))
