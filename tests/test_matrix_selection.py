"""``-k``: which cells of a matrix a run takes."""

from __future__ import annotations

import argparse
from pathlib import Path

from compat.launch.run_config import _cells

REPO = Path(__file__).resolve().parents[1]


def _selected(select: str) -> list[str]:
    args = argparse.Namespace(
        matrix=REPO / "matrix/gpu1-te-vllm.toml", family=None, layout=None, select=select, shard=None
    )
    return [c.id for c in _cells(args)[0]]


def test_k_takes_cells_whose_id_holds_any_of_its_parts():
    """``-k a|b`` selects the cells whose id holds either part: leftover cells need no matrix of their own."""
    assert _selected("per-expert|dora") == [
        "qwen3_moe_serving.tp1.per-expert.te.bf16.vllm",
        "qwen3_serving.tp1.dora.te.bf16.vllm",
    ]
    assert _selected("qwen2_serving.tp1.attn") == ["qwen2_serving.tp1.attn.te.bf16.vllm"]
