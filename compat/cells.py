"""A cell: family x layout x load layout x adapter x dtype, with the readable id of CONTRACT.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compat.adapters import get_adapter
from compat.families import get_family
from compat.layouts import Layout, check_fits

__all__ = ["DTYPES", "Cell", "CellError"]

DTYPES = ("fp32", "bf16")
DEFAULT_ADAPTER = "lora"
DEFAULT_DTYPE = "fp32"


class CellError(ValueError):
    """A cell that cannot exist: unknown family/adapter/dtype, or a layout the family can't take."""


@dataclass(frozen=True, order=True)
class Cell:
    family: str
    layout: Layout
    load_layout: Layout
    adapter: str = DEFAULT_ADAPTER
    dtype: str = DEFAULT_DTYPE

    @classmethod
    def make(
        cls,
        family: str,
        layout: Layout,
        load_layout: Layout | None = None,
        adapter: str = DEFAULT_ADAPTER,
        dtype: str = DEFAULT_DTYPE,
    ) -> Cell:
        """Build and validate: every reason a cell cannot run is raised here, before any launch."""
        fam = get_family(family)
        kind = get_adapter(adapter)
        if dtype not in DTYPES:
            raise CellError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
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
        return cls(family, layout, load_layout, adapter, dtype)

    @property
    def id(self) -> str:
        parts = [self.family, self.layout.slug]
        if self.reshards:
            parts += ["to", self.load_layout.slug]
        if self.adapter != DEFAULT_ADAPTER:
            parts.append(self.adapter)
        if self.dtype != DEFAULT_DTYPE:
            parts.append(self.dtype)
        return ".".join(parts)

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
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cell:
        return cls(
            family=data["family"],
            layout=Layout.from_mapping(data["layout"]),
            load_layout=Layout.from_mapping(data["load_layout"]),
            adapter=data["adapter"],
            dtype=data["dtype"],
        )

    def __str__(self) -> str:
        return self.id
