"""The memory sync (compat.rank.memory_sync): its comparisons on known tensors and configs, verl's own
config from verl's pinned environment, and a stream fault that only the memory path can see.

The memory cells of the CI matrix (matrix/ci.toml, ``sync = ["memory"]``) are the cells; their planted
faults are tests/faults/stream.py, run by tests/test_faults.py in fp32 and bf16.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from compat.checks.adapter_names import module_scaling
from compat.checks.memory_sync import (
    compare_configs,
    compare_tensors,
    config_divergence,
    digest,
    ranks_agree,
    stream_modules,
)

Q, K = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
EXPERT = "model.layers.0.mlp.experts.1.down_proj"


def _stream() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(f"{m}.lora_{ab}.weight", torch.randn(8, 8, generator=g)) for m in (Q, K) for ab in "AB"]


def test_ranks_agree_names_what_a_rank_lacks_or_holds_otherwise():
    stream = _stream()
    assert ranks_agree([digest(stream), digest(stream)]) == []
    short = digest(stream[:-1])
    other = digest([(n, t + 1 if n.startswith(Q) else t) for n, t in stream])
    problems = ranks_agree([digest(stream), short, other])
    assert problems == [
        f"rank 1's adapter stream lacks 1 of rank 0's 4 tensors, e.g. ['{K}.lora_B.weight']",
        f"rank 2's adapter stream holds other values in 2 of rank 0's 4 tensors, e.g. "
        f"['{Q}.lora_A.weight', '{Q}.lora_B.weight']",
    ]


def test_compare_tensors_is_bit_exact_by_name_shape_and_dtype():
    file = {f"base_model.model.{n}": t for n, t in _stream()}
    assert compare_tensors(dict(file), file, "the stream") == []
    memory = dict(file)
    q_a = f"base_model.model.{Q}.lora_A.weight"
    memory[q_a] = memory[q_a] + 2**-20
    memory.pop(f"base_model.model.{K}.lora_B.weight")
    memory[f"base_model.model.{K}.lora_A.weight"] = file[f"base_model.model.{K}.lora_A.weight"].double()
    problems = compare_tensors(memory, file, "the stream")
    assert problems[0] == f"the stream lacks 1 tensors of the file export, e.g. ['base_model.model.{K}.lora_B.weight']"
    assert "differs from the file export in 2 tensors" in problems[1]
    assert "(dtype torch.float64, in the file torch.float32)" in problems[1] and "max |diff| 9.5" in problems[1]


def test_compare_configs_names_each_field():
    file = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj"], "task_type": "CAUSAL_LM"}
    same = {"r": 8, "lora_alpha": 16, "target_modules": ["k_proj", "q_proj"], "task_type": "CAUSAL_LM"}
    assert compare_configs(same, file, "memory") == []
    problems = compare_configs({**same, "lora_alpha": 32, "use_dora": True}, file, "memory")
    assert problems == [
        "memory differs from the file export's adapter_config.json in 2 fields: "
        "lora_alpha: 32, in the file 16; use_dora: True, in the file '<absent>'"
    ]


def test_module_scaling_follows_peft_patterns_and_rslora():
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"mlp.experts.1.down_proj": 4}, "alpha_pattern": {}}
    assert module_scaling(config, Q) == (8, 16, 2.0)
    assert module_scaling(config, EXPERT) == (4, 16, 4.0)
    assert module_scaling({**config, "alpha_pattern": {"q_proj": 4}}, Q) == (8, 4, 0.5)
    assert module_scaling({"r": 16, "lora_alpha": 16, "use_rslora": True}, Q) == (16, 16, 4.0)


def test_config_divergence_locates_scaling_and_dora_and_records_the_rest():
    verl = {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    file = {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {EXPERT: 4},
        "use_dora": True,
        "target_modules": ["down_proj", "q_proj"],
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
    }
    problems, inert = config_divergence(verl, file, [Q, EXPERT], "verl", "verl.py:1")
    assert [names for _, names in problems] == [(EXPERT,), (Q, EXPERT)]
    assert problems[0][0] == (
        "verl's config scales 1 of the 2 streamed modules by 2 (r=8, lora_alpha=16), the file export by 4 "
        "(r=4, lora_alpha=16, by its rank_pattern), e.g. model.layers.{0}.mlp.experts.{1}.down_proj: verl.py:1"
    )
    assert (
        problems[1][0]
        == "verl's config has use_dora=False, the file export use_dora=True, for all 2 streamed modules: verl.py:1"
    )
    assert set(inert) == {"target_modules"}
    assert config_divergence(verl, {**verl, "target_modules": ["q_proj"]}, [Q], "verl", "")[0] == []


def test_stream_modules_in_order():
    assert stream_modules([n for n, _ in _stream()] + ["base_model.model.x.lora_magnitude_vector"]) == [Q, K, "x"]


def test_verl_config_is_verls_own(tmp_path):
    """verl 0.9.1's build_peft_config_for_vllm, run in verl's pinned environment (built by make serving-env):
    r, alpha and dropout of model.lora and nothing else of the adapter (no patterns, no DoRA)."""
    from compat.serving.frameworks import framework_config, framework_pins

    assert framework_pins("verl").packages["verl"] == "0.9.1"
    out = framework_config("verl", {"type": "dora", "rank": 4, "alpha": 8, "dropout": 0.1, "normalize_moe_lora": True})
    assert out["peft_config"] == {
        "task_type": "CAUSAL_LM",
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": "all-linear",
        "bias": "none",
        "lora_dropout": 0.1,
    }
    assert out["function"].startswith("verl/utils/megatron_peft_utils.py:")
    assert out["steps"]["the adapter streamed on every rank"].startswith(
        "verl/workers/engine/megatron/transformer_impl.py:"
    )


@pytest.mark.cell
def test_a_stream_fault_is_invisible_to_the_file_path(monkeypatch, tmp_path, compat_backend):
    """The stream losing its last tensor (faults/stream.py) leaves the file cell passing: only a memory cell
    (tests/test_faults.py, stream_tail_dropped) can fail on it."""
    from faults.catalogue import by_name
    from test_faults import cell_of, plant

    from compat.launch.launcher import run_cell

    plant(monkeypatch, "stream_tail_dropped")
    fault = by_name("stream_tail_dropped")
    assert fault.sync == "memory"
    memory = cell_of(fault)
    result = run_cell(replace(memory, sync="file"), compat_backend, workdir=tmp_path)
    assert result.status == "pass", result.reason
