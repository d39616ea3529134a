"""How an exported HF PEFT adapter names its tensors, and how a long list of modules reads in a message.

Shared by the checks on the files (``peft_files``) and on what ``peft`` made of them (``peft_load``).
"""

from __future__ import annotations

import re

__all__ = ["KEY", "PREFIX", "summarise"]

KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?:(?P<kind>lora_A|lora_B)\.weight|(?P<magnitude>lora_magnitude_vector)(?:\.weight)?)$"
)
PREFIX = "base_model.model."


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
