"""What a backend is (``compat.rank.backends`` picks one): a module of its own, so code that annotates with
it (``compat.rank.model_build``) does not import the package that imports the backends, which import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["Backend"]


class Backend(Protocol):
    name: str
    dist_backend: str

    def setup(self, local_rank: int) -> None:
        """Prepare this process (device, workarounds) before megatron is imported."""

    @property
    def device(self) -> torch.device: ...

    def configure(self, provider: object) -> None:
        """Set provider fields that depend on the backend."""

    def forward(self, model: list, input_ids: torch.Tensor, hidden_size: int) -> torch.Tensor | None:
        """Logits (vocab-sharded under TP) on the last pipeline stage, None elsewhere."""
