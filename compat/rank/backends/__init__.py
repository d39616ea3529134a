"""Backends: where a cell's ranks run (CPU processes over gloo, or one GPU each over NCCL).

A backend decides the process-group backend, the device, the provider settings that only make
sense there (token dispatcher, CPU initialisation) and how a forward pass crosses pipeline
stages. Everything else in a cell is the same on both.
"""

from __future__ import annotations

from compat.rank.backends.protocol import Backend

__all__ = ["BACKENDS", "Backend", "detect", "get_backend", "rank_env", "resolve"]

BACKENDS = ("cpu", "cuda")

# Set in every CUDA rank's environment before it starts:
# - NVLink multicast off, as the device machines require (device README, KINDS.md);
# - NVIDIA_TF32_OVERRIDE=0: fp32 means fp32. Transformer Engine runs every pure-fp32 GEMM with
#   CUBLAS_COMPUTE_32F_FAST_TF32 (transformer_engine/common/gemm/cublaslt_gemm.cu, 2.20), which
#   puts TE cells 3e-4 off the HF side in fp32; cuBLAS reads this variable when it starts, and it
#   overrides that compute type. bf16 GEMMs are unaffected. docs/explanation/gpus-and-te.md has the measurement.
# - TRITON_CACHE_AUTOTUNING=1: Triton keeps its autotuning results in its on-disk cache (triton 3.6
#   ``knobs.autotuning.cache``), so a cold rank reuses what an earlier one measured instead of timing
#   every configuration of TE's permutation kernels again on its first MoE forward of each dtype
#   (``transformer_engine/pytorch/triton/permutation.py``); they move data, any configuration moves it alike.
CUDA_RANK_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "NVIDIA_TF32_OVERRIDE": "0",
    "TRITON_CACHE_AUTOTUNING": "1",
}


def get_backend(name: str) -> Backend:
    if name == "cpu":
        from compat.rank.backends.cpu import CpuBackend

        return CpuBackend()
    if name == "cuda":
        from compat.rank.backends.cuda import CudaBackend

        return CudaBackend(CUDA_RANK_ENV)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


def detect() -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` (imports torch: not for plugin load time)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve(name: str | None) -> str:
    """The backend a run uses: ``auto`` (or None) is ``cuda`` where a GPU is visible, else ``cpu``."""
    if name in (None, "auto"):
        return detect()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    return name


def rank_env(name: str) -> dict[str, str]:
    """Environment a rank of this backend starts with (on top of the caller's)."""
    return dict(CUDA_RANK_ENV) if name == "cuda" else {}
