"""Checks on an exported HF PEFT adapter directory, before ``peft`` loads it (after: ``peft_load``,
whose check is named here too).

What ``peft`` tolerates silently is what these checks refuse: keys it cannot place (it warns
and the adapter does nothing), a config whose ``r``/``lora_alpha`` scale the adapter wrongly,
``target_modules`` that name modules without tensors, and modules the adapter targets but the
export left out (a dropped expert, a missing pipeline stage).

Modules are named as the base model's checkpoint names its weights (``model.layers.0.mlp.
experts.2.down_proj``): that is the form the export writes and ``peft`` converts from, also
where transformers fuses experts in memory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compat.checks.adapter_names import KEY, PREFIX, pattern_matches, pattern_value, summarise
from compat.checks.peft_load import check_loaded_by_peft
from compat.checks.problems import Listed

__all__ = ["HF_MODULES", "check_adapter_dir", "check_loaded_by_peft", "compare_exports", "expected_modules"]


# The HF modules each bridge target adapts, for Llama-style naming.
HF_MODULES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_q": ("q_proj",),
    "linear_k": ("k_proj",),
    "linear_v": ("v_proj",),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc1_gate": ("gate_proj",),
    "linear_fc1_up": ("up_proj",),
    "linear_fc2": ("down_proj",),
}


def _base_weights(hf_dir: Path) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape, from the base checkpoint's safetensors headers."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shape = tuple(f.get_slice(key).get_shape())
                if key.endswith(".weight"):
                    shapes[key.removesuffix(".weight")] = shape
                elif len(shape) == 3 and not key.endswith("bias"):
                    # fused experts stored as one [experts, ., .] tensor (gpt-oss ``mlp.experts.gate_up_proj``)
                    shapes[key] = shape
    return shapes


def expected_modules(
    base: dict[str, tuple[int, ...]], targets: tuple[str, ...], hf_modules: dict[str, tuple[str, ...]] | None = None
) -> set[str]:
    """Base modules the targets adapt; ``hf_modules`` (a family's own names) overrides HF_MODULES per target."""
    names = {**HF_MODULES, **(hf_modules or {})}
    suffixes = {s for t in targets for s in names.get(t.rsplit(".", 1)[-1], ())}  # '*.experts.*.linear_fc1' too
    return {m for m in base if m.rsplit(".", 1)[-1] in suffixes and len(base[m]) in (2, 3)}


def _peft_targets(target_modules: Any, module: str) -> bool:
    """peft's rule: a list matches a name or a dotted suffix; a string is a full-match regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def check_adapter_dir(
    path: Path, adapter: Any, hf_dir: Path, hf_modules: dict[str, tuple[str, ...]] | None = None
) -> list[str]:
    """Everything wrong with the files, named by tensor and module; empty when all is well."""
    from safetensors import safe_open

    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    missing = [p.name for p in (config_path, weights_path) if not p.exists()]
    if missing:
        return [f"export wrote no {', '.join(missing)} in {path}"]
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        return [f"adapter_config.json is not JSON: {exc}"]
    problems = _config_problems(config, adapter, hf_dir)
    try:
        with safe_open(str(weights_path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        return [*problems, f"adapter_model.safetensors cannot be read: {type(exc).__name__}: {exc}"]
    modules, unnamed = _modules(shapes)
    problems += unnamed
    base = _base_weights(hf_dir)
    wrapped = _param_wrappers(config, modules, base)
    problems += wrapped.problems
    modules = {m: parts for m, parts in modules.items() if m not in wrapped.modules}
    problems += _shape_problems(modules, base, config, adapter.rank)
    if config.get("use_dora"):
        no_magnitude = sorted(m for m, parts in modules.items() if "lora_magnitude_vector" not in parts)
        if no_magnitude:
            problems.append(
                Listed(
                    f"use_dora is set but {len(no_magnitude)} of {len(modules)} modules carry no lora_magnitude_vector "
                    f"(peft then re-initialises the magnitudes from the base weights), e.g. {summarise(no_magnitude)}",
                    no_magnitude,
                )
            )
    problems += _pattern_problems(config, modules, adapter)
    problems += _target_problems(config, modules)
    wanted = {m for m in expected_modules(base, adapter.targets, hf_modules) if re.search(adapter.hf_scope, m)}
    wanted -= wrapped.covered
    absent = sorted(wanted - set(modules))
    if absent:
        problems.append(
            Listed(
                f"the export has no adapter for {len(absent)} of the {len(wanted)} "
                f"modules targeted by {list(adapter.targets)}, e.g. {summarise(absent)}",
                absent,
            )
        )
    stray = sorted(set(modules) - wanted)
    if stray:
        problems.append(
            Listed(f"the export has adapters for {len(stray)} modules not targeted, e.g. {summarise(stray)}", stray)
        )
    return problems


@dataclass(frozen=True)
class _Wrapped:
    """Modules adapted through peft's ParamWrapper (``target_parameters``): fused 3-D expert tensors."""

    modules: set[str]  # file module names, ``.base_layer`` nesting included
    covered: set[str]  # the base's 3-D parameters they adapt
    problems: list[str]


def _param_wrappers(
    config: dict[str, Any], modules: dict[str, dict[str, tuple[int, ...]]], base: dict[str, tuple[int, ...]]
) -> _Wrapped:
    """peft nests one ParamWrapper per targeted parameter of a module (``experts.lora_A``,
    ``experts.base_layer.lora_A``, ...): each parent must carry one LoRA pair per parameter that
    ``target_parameters`` names in it. Their shapes are peft's to judge as it loads them."""
    names = config.get("target_parameters") or []
    params = [p for p in base if len(base[p]) == 3 and any(p == n or p.endswith("." + n) for n in names)]
    parents: dict[str, list[str]] = {}
    for p in params:
        parents.setdefault(p.rsplit(".", 1)[0], []).append(p)
    depths: dict[str, set[int]] = {}
    for m in modules:
        stripped = re.sub(r"(\.base_layer)+$", "", m)
        if stripped in parents:
            depths.setdefault(stripped, set()).add(m.count(".base_layer"))
    problems = [
        f"{parent} carries {len(depths.get(parent, ()))} LoRA pairs, but target_parameters names "
        f"{len(ps)} of its parameters ({', '.join(p.rsplit('.', 1)[1] for p in sorted(ps))})"
        for parent, ps in sorted(parents.items())
        if parent in depths and len(depths[parent]) != len(ps)
    ]
    return _Wrapped(
        modules={m for m in modules if re.sub(r"(\.base_layer)+$", "", m) in depths},
        covered={p for parent in depths for p in parents[parent]},
        problems=problems,
    )


def _config_problems(config: dict[str, Any], adapter: Any, hf_dir: Path) -> list[str]:
    want = {
        "peft_type": "LORA",
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_dora": adapter.peft == "dora",
        "base_model_name_or_path": str(hf_dir),
    }
    problems = [
        f"adapter_config.json: {key} is {config.get(key)!r}, expected {value!r}"
        for key, value in want.items()
        if config.get(key) != value
    ]
    if not config.get("target_modules") and not config.get("target_parameters"):
        problems.append(
            "adapter_config.json has no target_modules (peft would fall back to its default targets for the model "
            "type, or refuse the config)"
        )
    return problems


def _modules(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, dict[str, tuple[int, ...]]], list[str]]:
    """module -> {lora_A/lora_B/lora_magnitude_vector: shape}; and the problem with keys peft cannot load."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    unprefixed: list[str] = []
    other: list[str] = []
    for key, shape in sorted(shapes.items()):
        m = KEY.match(key)
        if m:
            modules.setdefault(m["module"], {})[m["kind"] or m["magnitude"]] = shape
        else:
            (other if key.startswith(PREFIX) else unprefixed).append(key)
    problems: list[str] = []
    if unprefixed:
        problems.append(
            Listed(
                f"{len(unprefixed)} of {len(shapes)} tensors are not LoRA weight names peft loads (no "
                f"'base_model.model.' prefix: peft would skip them with a warning), e.g. {unprefixed[:2]}",
                unprefixed,
            )
        )
    if other:
        message = f"{len(other)} of {len(shapes)} tensors are not LoRA weight names peft loads, e.g. {other[:2]}"
        problems.append(Listed(message, other))
    return modules, problems


def _shape_problems(
    modules: dict[str, dict[str, tuple[int, ...]]], base: dict[str, tuple[int, ...]], config: dict[str, Any], r0: int
) -> list[str]:
    problems: list[str] = []
    unknown = sorted(m for m in modules if m not in base)
    if unknown:
        problems.append(
            Listed(
                f"{len(unknown)} of {len(modules)} modules with adapter tensors are not modules of the HF model, "
                f"e.g. {summarise(unknown)}",
                unknown,
            )
        )
    for module, parts in sorted(modules.items()):
        if module not in base:
            continue
        if len(base[module]) != 2:
            problems.append(
                f"{PREFIX}{module}.lora_*: {module} is a fused {len(base[module])}-D tensor {base[module]} "
                f"(one slice per expert), but the export wrote one 2-D LoRA pair "
                f"{parts.get('lora_A')}/{parts.get('lora_B')} for it: peft has no module of that name to place it on"
            )
            continue
        out_f, in_f = base[module]
        r = pattern_value(config.get("rank_pattern"), module, config.get("r") or r0)
        if "lora_magnitude_vector" in parts and parts["lora_magnitude_vector"] != (out_f,):
            problems.append(
                f"{module}: lora_magnitude_vector has shape {parts['lora_magnitude_vector']}, expected ({out_f},)"
            )
        for kind, want_shape in {"lora_A": (r, in_f), "lora_B": (out_f, r)}.items():
            if kind not in parts:
                problems.append(f"{module}: {kind} is missing")
            elif parts[kind] != want_shape:
                problems.append(
                    f"{PREFIX}{module}.{kind}.weight has shape {parts[kind]}, expected {want_shape} "
                    f"(r={r}, {module} is {out_f}x{in_f})"
                )
    return problems


def _pattern_problems(config: dict[str, Any], modules: dict[str, Any], adapter: Any) -> list[str]:
    problems: list[str] = []
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        # the harness trains one rank for every module, or rank // top-k for experts (normalize_moe_lora)
        if rank != adapter.rank and not dict(adapter.options).get("normalize_moe_lora"):
            problems.append(
                f"adapter_config.json: rank_pattern gives {pattern!r} r={rank}; the adapter has r={adapter.rank}"
            )
    for key in ("rank_pattern", "alpha_pattern"):
        # peft applies a key to the modules it matches and ignores one that matches none, silently
        orphans = [p for p in config.get(key) or {} if not any(pattern_matches(p, m) for m in modules)]
        for pattern in orphans:
            problems.append(
                f"adapter_config.json: {key} key {pattern!r} matches no module with adapter tensors "
                "(peft would ignore it without a warning)"
            )
    return problems


def _target_problems(config: dict[str, Any], modules: dict[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    problems: list[str] = []
    untargeted = sorted(m for m in modules if not _peft_targets(targets, m))
    if untargeted:
        problems.append(
            Listed(
                f"target_modules {targets} does not name {len(untargeted)} modules with tensors, e.g. {untargeted[:2]}",
                untargeted,
            )
        )
    if isinstance(targets, list):
        idle = [t for t in targets if not any(_peft_targets([t], m) for m in modules)]
        if idle:
            problems.append(f"target_modules names {idle}, which carry no adapter tensor")
    return problems


def compare_exports(got: Path, reference: Path) -> list[str]:
    """A resharded load must export the very tensors the save layout exported, bit for bit."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(got / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    problems: list[str] = []
    missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    if missing or extra:
        problems.append(
            Listed(
                f"export after resharding has other tensors than at the save layout: "
                f"missing {missing[:3]}, extra {extra[:3]}",
                missing + extra,
            )
        )
    differ = {}
    for name in sorted(set(a) & set(b)):
        if a[name].shape != b[name].shape:
            differ[name] = f"{name} (shape {tuple(a[name].shape)}, at the save layout {tuple(b[name].shape)})"
        elif not torch.equal(a[name], b[name]):
            differ[name] = f"{name} (max |diff| {(a[name].double() - b[name].double()).abs().max():.3e})"
    if differ:
        problems.append(
            Listed(
                f"{len(differ)} of {len(set(a) & set(b))} tensors differ from the export at the save layout, "
                f"e.g. {'; '.join(list(differ.values())[:3])}",
                differ,
            )
        )
    return problems
