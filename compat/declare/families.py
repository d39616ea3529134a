"""Model families: tiny HF configs declared as data (``compat/data/families.toml``), validated on load.

Nothing here imports torch or transformers at module load: the CLI and the pytest plugin read
families to refuse bad input before any worker starts. Building the model is a separate call,
made inside a worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from compat.declare.declarations import Declarations

__all__ = [
    "Dims",
    "Family",
    "FamilyError",
    "add_families",
    "base_device_kind",
    "build_tiny_model",
    "ensure_tiny_model",
    "families",
    "get_family",
    "require_model_type",
    "tiny_model_dir",
]

_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_FAMILY_KEYS = {"model_type", "architecture", "num_experts", "about", "config", "hf_modules", "scale", "seed"}


class FamilyError(ValueError):
    """An unknown family, or a malformed family declaration."""


@dataclass(frozen=True)
class Dims:
    """The sizes a layout must divide (read from the merged HF config)."""

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int
    vocab_size: int


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    architecture: str
    about: str
    config: dict[str, Any] = field(hash=False, compare=False)
    num_experts: int = 0
    # bridge LoRA target -> the HF module names it adapts, where they differ from Llama's
    hf_modules: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False, compare=False)
    scale: bool = False  # real widths (matrix/scale.toml, one GPU): never built on a CPU runner
    seed: int = 0  # the random HF base's draw: copies at other seeds measure what a bound owes to one draw

    @property
    def dims(self) -> Dims:
        c = self.config
        return Dims(
            num_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            hidden_size=c["hidden_size"],
            vocab_size=c["vocab_size"],
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def _parse(data: dict[str, Any], source: str, known: dict[str, Family] | None = None) -> dict[str, Family]:
    """The file's families and its profiles' (which may name ``known`` ones: the built-in families, then
    earlier files')."""
    unknown_top = set(data) - {"defaults", "family", "profile"}
    if unknown_top:
        raise FamilyError(
            f"{source}: unknown top-level keys {sorted(unknown_top)}; write [defaults], [family.NAME] "
            "and [profile.NAME] tables"
        )
    defaults = data.get("defaults", {})
    declared = data.get("family", {})
    if not isinstance(declared, dict) or not (declared or data.get("profile")):
        raise FamilyError(f"{source}: no [family.NAME] or [profile.NAME] tables")
    out: dict[str, Family] = {}
    for name, spec in declared.items():
        unknown = set(spec) - _FAMILY_KEYS
        if unknown:
            raise FamilyError(f"{source}: family {name!r} has unknown keys {sorted(unknown)}")
        for key in ("model_type", "architecture"):
            if not isinstance(spec.get(key), str):
                raise FamilyError(f"{source}: family {name!r} needs a string {key!r}")
        own = spec.get("config", {})
        if "head_dim" in defaults and "head_dim" not in own and {"hidden_size", "num_attention_heads"} & set(own):
            raise FamilyError(
                f"{source}: family {name!r} sets {sorted({'hidden_size', 'num_attention_heads'} & set(own))} but would "
                f"inherit head_dim = {defaults['head_dim']} from [defaults]: declare its head_dim (some HF configs "
                "keep a head_dim their model ignores, and the bridge reads it: OLMoE's k_norm was then sized "
                "head_dim x heads on Megatron's side, megatron/bridge/models/olmoe/olmoe_bridge.py:67-69)"
            )
        config = {**defaults, **own}
        num_experts = spec.get("num_experts", 0)
        if num_experts:
            declared_experts = [config[k] for k in _EXPERT_KEYS if k in config]
            if declared_experts != [num_experts]:
                raise FamilyError(
                    f"{source}: family {name!r} says num_experts={num_experts} but its config "
                    f"gives {dict((k, config[k]) for k in _EXPERT_KEYS if k in config)}"
                )
        hf_modules = spec.get("hf_modules", {})
        if not isinstance(hf_modules, dict) or not all(
            isinstance(v, list) and v and all(isinstance(m, str) for m in v) for v in hf_modules.values()
        ):
            raise FamilyError(
                f"{source}: family {name!r}: hf_modules must map bridge targets to non-empty lists of HF module names"
            )
        out[name] = Family(
            name=name,
            model_type=spec["model_type"],
            architecture=spec["architecture"],
            about=spec.get("about", ""),
            config=config,
            num_experts=num_experts,
            hf_modules={k: tuple(v) for k, v in hf_modules.items()},
            scale=bool(spec.get("scale", False)),
            seed=_seed(spec.get("seed", 0), name, source),
        )
    return {**out, **_profiles(data.get("profile", {}), {**(known or {}), **out}, source)}


def _seed(value: Any, name: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FamilyError(f"{source}: family {name!r}: seed must be a non-negative integer, not {value!r}")
    return value


def _profiles(profiles: dict[str, Any], declared: dict[str, Family], source: str) -> dict[str, Family]:
    """``[profile.NAME]``: the listed families again as ``FAMILY_SUFFIX`` (``suffix`` defaults to NAME), its
    config keys over theirs (the sizes a consumer needs: vLLM's CPU attention refuses the contract's
    head_dim 8) and its ``seed`` for their random base (matrix/noise/); two profiles of one suffix size
    different families alike."""
    out: dict[str, Family] = {}
    for profile, spec in profiles.items():
        unknown = set(spec) - {"about", "families", "config", "suffix", "seed"}
        if unknown or not isinstance(spec.get("families"), list) or not isinstance(spec.get("config", {}), dict):
            raise FamilyError(
                f"{source}: profile {profile!r} needs 'families' (a list) and a 'config' table only (and a 'suffix', "
                "a 'seed')"
            )
        suffix = str(spec.get("suffix", profile))
        for name in spec["families"]:
            if name not in declared:
                raise FamilyError(f"{source}: profile {profile!r} names family {name!r}, not declared here or before")
            fam = declared[name]
            about = f"{fam.about}; {suffix} profile: {spec.get('about', '')}".rstrip(": ")
            config = {**fam.config, **spec.get("config", {})}
            if f"{name}_{suffix}" in out:
                raise FamilyError(f"{source}: profile {profile!r} declares {name}_{suffix} again")
            seed = _seed(spec.get("seed", fam.seed), f"{name}_{suffix}", source)
            out[f"{name}_{suffix}"] = replace(fam, name=f"{name}_{suffix}", about=about, config=config, seed=seed)
    return out


_DECLARED = Declarations("family", "families", "families.toml", _parse, FamilyError, "python -m compat families")


def families() -> dict[str, Family]:
    """Every declared family (built-in, then the user's files), by name."""
    return _DECLARED.all()


def get_family(name: str) -> Family:
    return _DECLARED.get(name)


def add_families(path: Path) -> None:
    """Add a user's family declarations (same schema as ``compat/data/families.toml``)."""
    _DECLARED.add_file(path)


def require_model_type(family: Family) -> None:
    """``Unsupported`` where the installed transformers has no such model type (an older release: the
    family cannot exist here). Every rank asks before rank 0 builds the model, so no peer is left
    waiting at the barrier for a rank that stopped."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if family.model_type not in CONFIG_MAPPING:
        from importlib.metadata import version

        from compat.checks.findings import Unsupported

        raise Unsupported(
            f"transformers {version('transformers')} has no model type {family.model_type!r} "
            "(transformers/models/auto/configuration_auto.py, CONFIG_MAPPING)"
        )


def build_tiny_model(family: Family, path: Path, device: str = "cpu") -> None:
    """Write the family's tiny HF model (random fp32 weights, drawn from ``family.seed``) to ``path``.

    The same seed gives the same weights on the same kind of device, so a resharding cell's second
    launch sees the model its first launch saved against. Weights are stored in fp32; a bf16 cell
    casts on load. ``device``: where they are drawn (``base_device_kind``), whose generator then
    gives the values, which is why ``tiny_model_dir`` keys the cache by the device kind.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    require_model_type(family)
    config = AutoConfig.for_model(family.model_type, **family.config)
    where = torch.device(device)
    gpus = [where.index if where.index is not None else torch.cuda.current_device()] if where.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus), where:  # the caller's random state is left as it was
        torch.manual_seed(family.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)


def base_device_kind(family: Family, backend: str) -> str:
    """Where the family's random HF base is drawn: a scale family's on the cell's GPU (transformers
    initialises a 1.7B-shaped model there in seconds, on the host in tens of them: issue 19), a toy
    family's on the host, in milliseconds and the same weights on every machine, so a toy cell on
    CPU and on GPU compares the same model."""
    return backend if family.scale and backend != "cpu" else "cpu"


def _cache_root() -> Path:
    """``$COMPAT_CACHE``, else ``$XDG_CACHE_HOME/megatron-lora-compat`` (``~/.cache/...``)."""
    if os.environ.get("COMPAT_CACHE"):
        return Path(os.environ["COMPAT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron-lora-compat"


def tiny_model_dir(family: Family, backend: str = "cpu") -> Path:
    """Where the family's tiny HF model is cached, read-only, for every cell of ``backend`` that uses it.

    The weights depend only on the family's declaration, the seed, the kind of device whose
    generator drew them (``base_device_kind``) and the torch and transformers releases that write
    them, so those make the key: a change to any gives another directory.
    """
    from importlib.metadata import version

    key = [family.model_type, family.config, family.seed, version("torch"), version("transformers")]
    kind = base_device_kind(family, backend)
    if kind != "cpu":
        key.append(kind)  # a host-built base keeps the key it always had
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return _cache_root() / "hf" / f"{family.name}-{digest}"


def ensure_tiny_model(family: Family, path: Path, device: str = "cpu") -> None:
    """Write the tiny model at ``path`` unless it is there; complete or absent, never half-written.

    It is built next to ``path`` and renamed into place, so cells building the same family at
    once cannot see a partial model: the first rename wins, the others discard their copy.
    """
    if (path / "config.json").is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(family, tmp, device)
    try:
        tmp.rename(path)
    except OSError:  # another process put it there first
        shutil.rmtree(tmp, ignore_errors=True)
