"""The adapter in memory, judged against the file export: pure comparisons of tensors and configs.

An RL framework's rollout sync hands its engine the tensors ``export_adapter_weights`` streams and a
config of its own (``compat.rank.memory_sync``). Nothing here knows where they came from: each
function compares one thing the memory path carries with what the file export (``save_hf_adapter``)
wrote, and says what differs by tensor, module or config field. A difference is a problem only where
a consumer would compute otherwise (a value, a shape, a name, a module's scaling, DoRA); a field that
changes nothing (``target_modules="all-linear"`` where the tensors decide, dropout at inference) is
recorded beside the problems, so a reader sees every divergence and which ones matter.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from compat.checks.adapter_names import lora_module, module_scaling, summarise

if TYPE_CHECKING:
    import torch

__all__ = [
    "EFFECTIVE_FIELDS",
    "compare_configs",
    "compare_tensors",
    "config_divergence",
    "digest",
    "ranks_agree",
    "stream_modules",
]


# Config fields that change what a consumer computes from the same tensors (peft's and vLLM's PEFT
# config): each is compared module by module. Every other field is compared too, and only recorded.
EFFECTIVE_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "fan_in_fan_out")


def digest(stream: list[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(name, shape, dtype, sha256 of the bytes) per streamed tensor, in stream order: what a rank hands
    its engine, small enough to gather from every rank."""
    import hashlib

    import torch

    out = []
    for name, t in stream:
        raw = t.detach().cpu().contiguous().view(torch.uint8) if t.numel() else t.detach().cpu()
        out.append((name, tuple(t.shape), str(t.dtype), hashlib.sha256(raw.numpy().tobytes()).hexdigest()))
    return out


def ranks_agree(digests: list[list[tuple[str, tuple[int, ...], str, str]]]) -> list[str]:
    """Every rank streams the whole adapter, bit for bit (each feeds its own engine): a rank that lacks a
    tensor, holds another, or other values, named with the tensors against rank 0's stream."""
    problems = []
    ref = {d[0]: d[1:] for d in digests[0]}
    for rank, rank_digest in enumerate(digests[1:], start=1):
        got = {d[0]: d[1:] for d in rank_digest}
        missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        differ = sorted(n for n in set(ref) & set(got) if got[n] != ref[n])
        for what, names in (("lacks", missing), ("holds, beside rank 0's,", extra), ("holds other values in", differ)):
            if names:
                problems.append(
                    f"rank {rank}'s adapter stream {what} {len(names)} of rank 0's {len(ref)} tensors, e.g. {names[:3]}"
                )
    return problems


def compare_tensors(memory: dict[str, torch.Tensor], file: dict[str, torch.Tensor], what: str) -> list[str]:
    """``what`` (the stream renamed by some code) against ``adapter_model.safetensors``: same names, shapes,
    dtypes and values, bit for bit (both come from one export of the same model, with no arithmetic)."""
    import torch

    problems = []
    missing, extra = sorted(set(file) - set(memory)), sorted(set(memory) - set(file))
    if missing:
        problems.append(f"{what} lacks {len(missing)} tensors of the file export, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{what} holds {len(extra)} tensors the file export does not, e.g. {extra[:3]}")
    differ = []
    for name in sorted(set(file) & set(memory)):
        a, b = memory[name], file[name]
        if a.shape != b.shape:
            differ.append(f"{name} (shape {tuple(a.shape)}, in the file {tuple(b.shape)})")
        elif a.dtype != b.dtype:
            differ.append(f"{name} (dtype {a.dtype}, in the file {b.dtype})")
        elif not torch.equal(a.cpu(), b.cpu()):
            differ.append(f"{name} (max |diff| {(a.double().cpu() - b.double().cpu()).abs().max():.3e})")
    if differ:
        problems.append(f"{what} differs from the file export in {len(differ)} tensors, e.g. {'; '.join(differ[:3])}")
    return problems


def compare_configs(memory: dict[str, Any], file: dict[str, Any], what: str) -> list[str]:
    """Every field of ``what`` (a config built in memory) against ``adapter_config.json``, by name."""
    differ = [
        f"{key}: {_shown(memory.get(key, '<absent>'))}, in the file {_shown(file.get(key, '<absent>'))}"
        for key in sorted(set(memory) | set(file))
        if _plain(memory.get(key)) != _plain(file.get(key))
    ]
    return (
        [f"{what} differs from the file export's adapter_config.json in {len(differ)} fields: {'; '.join(differ)}"]
        if differ
        else []
    )


def stream_modules(names: list[str]) -> list[str]:
    """The modules a stream adapts (``model.layers.0.self_attn.q_proj``), in first-seen order."""
    out: dict[str, None] = {}
    for name in names:
        module, kind = lora_module(name)
        if kind:
            out.setdefault(module)
    return list(out)


def config_divergence(
    framework: dict[str, Any], file: dict[str, Any], modules: list[str], who: str, where: str
) -> tuple[list[tuple[str, tuple[str, ...]]], dict[str, str]]:
    """What ``who``'s config (built by ``where``) makes a consumer compute otherwise than the file export's,
    module by module over the streamed ``modules``: ([(message, modules)], {field: how it differs, without effect})."""
    problems: list[tuple[str, tuple[str, ...]]] = []
    scaled: dict[tuple[tuple[int, float, float], tuple[int, float, float]], list[str]] = {}
    for module in modules:
        ours, theirs = module_scaling(framework, module), module_scaling(file, module)
        if not math.isclose(ours[2], theirs[2], rel_tol=1e-12) or ours[0] != theirs[0]:
            scaled.setdefault((ours, theirs), []).append(module)
    for (ours, theirs), names in scaled.items():
        problems.append(
            (
                f"{who}'s config scales {len(names)} of the {len(modules)} streamed modules by {ours[2]:g} "
                f"(r={ours[0]}, lora_alpha={ours[1]:g}), the file export by {theirs[2]:g} (r={theirs[0]}, "
                f"lora_alpha={theirs[1]:g}{_patterned(file)}), e.g. {summarise(names)}: {where}",
                tuple(names),
            )
        )
    for field in ("use_dora", "fan_in_fan_out"):
        if bool(framework.get(field)) != bool(file.get(field)):
            problems.append(
                (
                    f"{who}'s config has {field}={bool(framework.get(field))}, the file export {field}="
                    f"{bool(file.get(field))}, for all {len(modules)} streamed modules: {where}",
                    tuple(modules),
                )
            )
    inert = {
        key: f"{_shown(framework.get(key, '<absent>'))}, in the file {_shown(file.get(key, '<absent>'))}"
        for key in sorted(set(framework) | set(file))
        if key not in EFFECTIVE_FIELDS and _plain(framework.get(key)) != _plain(file.get(key))
    }
    return problems, inert


def _patterned(config: dict[str, Any]) -> str:
    return ", by its rank_pattern" if config.get("rank_pattern") else ""


def _plain(value: Any) -> Any:
    """Enums (peft's TaskType, PeftType) as their values, lists as sets where order means nothing."""
    value = getattr(value, "value", value)
    return sorted(value) if isinstance(value, list | tuple | set) else value


def _shown(value: Any) -> str:
    text = repr(_plain(value))
    return text if len(text) <= 120 else text[:117] + "..."
