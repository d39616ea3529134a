"""How an exported HF PEFT adapter names its tensors, and how a long list of modules reads in a message.

Shared by the checks on the files (``peft_files``) and on what ``peft`` made of them (``peft_load``).
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["KEY", "PREFIX", "lora_module", "module_scaling", "pattern_matches", "pattern_value", "summarise"]

KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?:(?P<kind>lora_A|lora_B)\.weight|(?P<magnitude>lora_magnitude_vector)(?:\.weight)?)$"
)
PREFIX = "base_model.model."
# Any LoRA key: file naming (``base_model.model.`` prefix) or in memory (none), peft's adapter name or not.
_ANY_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?$"
)


def lora_module(key: str) -> tuple[str, str]:
    """(``model.layers.0.self_attn.q_proj``, ``lora_A``) of any LoRA key: file or in-memory naming, with or without
    peft's adapter name (``.default``); (the key without the prefix, "") for a key that names no LoRA tensor."""
    m = _ANY_KEY.match(key)
    return (m["module"], m["kind"]) if m else (key.removeprefix(PREFIX), "")


def pattern_matches(pattern: str, module: str) -> bool:
    """peft's rule for rank_pattern/alpha_pattern keys (``peft.utils.other.get_pattern_key``)."""
    try:
        return re.match(rf"(.*\.)?({pattern})$", module) is not None
    except re.error:
        return False


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """The value of the first of ``patterns`` that names ``module``, else ``default``."""
    for pattern, value in (patterns or {}).items():
        if pattern_matches(pattern, module):
            return value
    return default


def module_scaling(config: dict[str, Any], module: str) -> tuple[int, float, float]:
    """(r, lora_alpha, scaling) a consumer applies to ``module`` under ``config``: peft's and vLLM's rule,
    ``rank_pattern``/``alpha_pattern`` keys matched as peft matches them, rsLoRA's square root, peft's
    defaults (r = lora_alpha = 8) where the config has none."""
    r = pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return r, alpha, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def summarise(modules: list[str]) -> str:
    """``model.layers.{0,1,2,3}.mlp.experts.{2,3}.down_proj``-style, so a dropped expert reads as one.

    For people: the problem carries the full list (:class:`compat.checks.problems.Listed`).
    """
    groups: dict[str, set[str]] = {}
    for m in modules:
        shape = re.sub(r"\.(\d+)\.", ".#.", m)
        groups.setdefault(shape, set()).add(m)
    out = []
    for shape, members in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:6]:
        numbers = [re.findall(r"\.(\d+)\.", m) for m in members]
        cols = list(zip(*numbers, strict=False)) if numbers and all(len(n) == len(numbers[0]) for n in numbers) else []
        text = shape
        for col in cols:
            text = text.replace("#", "{" + ",".join(sorted(set(col), key=int)) + "}", 1)
        out.append(text)
    return "; ".join(out)
