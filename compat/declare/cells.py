"""A cell: family x layout x load layout x adapter x layer spec x dtype x sync (x serving engines), with
the readable id of the contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compat.declare.adapters import get_adapter
from compat.declare.families import get_family
from compat.declare.layouts import Layout, check_fits
from compat.declare.specs import DEFAULT_SPEC, SPECS
from compat.declare.suggest import unknown_name

__all__ = ["DEFAULT_ADAPTER", "DEFAULT_DTYPE", "DEFAULT_SPEC", "DEFAULT_SYNC", "DTYPES", "SYNCS"]
__all__ += ["Cell", "CellError", "selects"]


def selects(k: str | None, cell_id: str) -> bool:
    """``-k``'s rule: a cell is selected when one of the ``|``-separated parts lies within its id; no ``-k``
    selects every cell."""
    return not k or any(part in cell_id for part in k.split("|"))


DTYPES = ("fp32", "bf16")
DEFAULT_ADAPTER = "lora"
DEFAULT_DTYPE = "fp32"
# How the adapter reaches its consumers: the HF PEFT files (save_hf_adapter), or in memory as an RL
# framework's rollout sync streams it (export_adapter_weights on every rank, the framework's own
# config: compat.rank.memory_sync). A memory cell checks the file export as well, and the two against each other.
SYNCS = ("file", "memory")
DEFAULT_SYNC = "file"


class CellError(ValueError):
    """A cell that cannot exist: unknown family/adapter/dtype, or a layout the family can't take."""


ENGINES = ("vllm", "sglang")  # the serving engines, one module each under compat/serving/


@dataclass(frozen=True, order=True)
class Cell:
    family: str
    layout: Layout
    load_layout: Layout
    adapter: str = DEFAULT_ADAPTER
    dtype: str = DEFAULT_DTYPE
    spec: str = DEFAULT_SPEC
    serve: tuple[str, ...] = ()  # serving engines that load the export too (compat.serving)
    sync: str = DEFAULT_SYNC

    @classmethod
    def make(
        cls,
        family: str,
        layout: Layout,
        load_layout: Layout | None = None,
        adapter: str = DEFAULT_ADAPTER,
        dtype: str = DEFAULT_DTYPE,
        spec: str = DEFAULT_SPEC,
        serve: tuple[str, ...] = (),
        sync: str = DEFAULT_SYNC,
    ) -> Cell:
        """Build and validate: every reason a cell cannot run is raised here, before any launch."""
        fam = get_family(family)
        kind = get_adapter(adapter)
        if dtype not in DTYPES:
            raise CellError(unknown_name("dtype", "dtypes", dtype, DTYPES))
        if spec not in SPECS:
            raise CellError(unknown_name("layer spec", "layer specs", spec, SPECS))
        if sync not in SYNCS:
            raise CellError(unknown_name("sync", "syncs", sync, SYNCS))
        if kind.specs and spec not in kind.specs:
            raise CellError(
                f"adapter {adapter} exists only for the {'/'.join(kind.specs)} spec ({kind.about}), not {spec}"
            )
        if kind.moe_only and not fam.is_moe:
            raise CellError(f"adapter {adapter} configures routed experts, which family {family} does not have")

        unknown = [e for e in serve if e not in ENGINES]
        if unknown:
            raise CellError(unknown_name("serving engine", "serving engines", unknown[0], ENGINES))
        if len(set(serve)) != len(serve):
            raise CellError(f"serve {list(serve)}: give each engine once, of {', '.join(ENGINES)}")
        load_layout = load_layout or layout
        check_fits(layout, fam)
        check_fits(load_layout, fam)
        for lay in {layout, load_layout}:
            for size, what in ((lay.tp, "tp"), (lay.etp if fam.is_moe else 1, "etp")):
                if kind.rank % size:
                    raise CellError(
                        f"adapter {adapter} has rank {kind.rank}, which {what}={size} does not divide: the bridge "
                        "shards LoRA A's rank over tensor parallelism (megatron/bridge/peft/utils.py:1019, "
                        "ColumnParallelLinear(in_features, dim))"
                    )
        return cls(family, layout, load_layout, adapter, dtype, spec, tuple(serve), sync)

    @property
    def id(self) -> str:
        """``family.layout[.to.layout][.adapter][.spec][.dtype][.sync][.engine]``: only axes off their default."""
        parts = [self.family, self.layout.slug]
        if self.reshards:
            parts += ["to", self.load_layout.slug]
        if self.adapter != DEFAULT_ADAPTER:
            parts.append(self.adapter)
        if self.spec != DEFAULT_SPEC:
            parts.append(self.spec)
        if self.dtype != DEFAULT_DTYPE:
            parts.append(self.dtype)
        if self.sync != DEFAULT_SYNC:
            parts.append(self.sync)
        return ".".join(parts + list(self.serve))

    @property
    def phases(self) -> list[tuple[str, Layout]]:
        """The launches of the cell: save then load when it reshards, else one round trip."""
        if self.reshards:
            return [("save", self.layout), ("load", self.load_layout)]
        return [("roundtrip", self.layout)]

    @property
    def reshards(self) -> bool:
        """Saved at one layout and loaded at another: two launches, two world sizes."""
        return self.load_layout != self.layout

    @property
    def world_size(self) -> int:
        """Processes of the launch that loads, exports and compares (the one results report)."""
        return self.load_layout.world_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "layout": self.layout.as_dict(),
            "load_layout": self.load_layout.as_dict(),
            "adapter": self.adapter,
            "dtype": self.dtype,
            "spec": self.spec,
            "serve": list(self.serve),
            "sync": self.sync,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        return cls(
            family=data["family"],
            layout=Layout.from_mapping(data["layout"]),
            load_layout=Layout.from_mapping(data["load_layout"]),
            adapter=data["adapter"],
            dtype=data["dtype"],
            spec=data.get("spec", DEFAULT_SPEC),
            serve=tuple(data.get("serve", ())),
            sync=data.get("sync", DEFAULT_SYNC),
        )

    def __str__(self) -> str:
        return self.id
