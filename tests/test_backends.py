"""One resolver for ``auto``: what a run records as its backend is where its ranks ran."""

from __future__ import annotations

import pytest

from compat.rank import backends


def test_auto_is_cuda_where_a_gpu_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "detect", lambda: "cuda")
    assert backends.resolve("auto") == backends.resolve(None) == "cuda"
    monkeypatch.setattr(backends, "detect", lambda: "cpu")
    assert backends.resolve("auto") == "cpu"


def test_a_named_backend_is_kept_and_an_unknown_one_refused() -> None:
    assert backends.resolve("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backends.resolve("tpu")


def test_cuda_ranks_compute_fp32_in_fp32() -> None:
    # Transformer Engine's fp32 GEMMs are TF32 unless cuBLAS is told otherwise (docs/explanation/gpus-and-te.md).
    assert backends.rank_env("cuda")["NVIDIA_TF32_OVERRIDE"] == "0"
    assert backends.rank_env("cpu") == {}
