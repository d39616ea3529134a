"""Backends: where a cell's ranks run (CPU processes over gloo, or one GPU each over NCCL).

A backend decides the process-group backend, the device, the provider settings that only make
sense there (token dispatcher, CPU initialisation) and how a forward pass crosses pipeline
stages. Everything else in a cell is the same on both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

__all__ = ["BACKENDS", "Backend", "detect", "get_backend"]

BACKENDS = ("cpu", "cuda")


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


def get_backend(name: str) -> Backend:
    if name == "cpu":
        from compat.backends.cpu import CpuBackend

        return CpuBackend()
    if name == "cuda":
        from compat.backends.cuda import CudaBackend

        return CudaBackend()
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


def detect() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (imports torch: not for plugin load time)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
