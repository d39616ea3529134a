"""The delta oracle's HF side and comparison, on hand-made tensors (no model, no ranks)."""

from __future__ import annotations

import json

import pytest
import torch

from compat.rank.delta_oracle import DELTA_RTOL, check_deltas, hf_deltas

Q = "model.layers.1.self_attn.q_proj"
OPROJ = "model.layers.1.self_attn.o_proj"


@pytest.fixture
def adapter_dir(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        f"base_model.model.{Q}.lora_A.weight": torch.randn(4, 16, generator=g),
        f"base_model.model.{Q}.lora_B.weight": torch.randn(32, 4, generator=g),
        f"base_model.model.{OPROJ}.lora_A.weight": torch.randn(2, 32, generator=g),
        f"base_model.model.{OPROJ}.lora_B.weight": torch.randn(16, 2, generator=g),
    }
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"o_proj": 2}, "alpha_pattern": {"o_proj": 6}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path, tensors


def test_hf_deltas_scale_as_peft_does(adapter_dir):
    path, t = adapter_dir
    d = hf_deltas(path)
    q = 8 / 4 * (t[f"base_model.model.{Q}.lora_B.weight"] @ t[f"base_model.model.{Q}.lora_A.weight"])
    o = 6 / 2 * (t[f"base_model.model.{OPROJ}.lora_B.weight"] @ t[f"base_model.model.{OPROJ}.lora_A.weight"])
    assert torch.equal(d[f"{Q}.weight"], q) and torch.equal(d[f"{OPROJ}.weight"], o)


def test_equal_deltas_pass_and_rolled_heads_are_named_by_row(adapter_dir):
    path, _ = adapter_dir
    hf = hf_deltas(path)
    same = check_deltas(iter(hf.items()), hf)
    assert same["problems"] == [] and same["weights"] == 2 and same["max_rel_diff"] == 0.0
    rolled = {**hf, f"{Q}.weight": hf[f"{Q}.weight"].roll(8, dims=0)}
    out = check_deltas(iter(rolled.items()), hf)
    assert len(out["problems"]) == 1 and out["max_rel_diff"] > DELTA_RTOL
    assert "in 1 of 2 weights" in out["problems"][0] and f"{Q}.weight (rows 0-31 of 32" in out["problems"][0]


def test_one_row_off_is_found_and_noise_is_not(adapter_dir):
    path, _ = adapter_dir
    hf = hf_deltas(path)
    w = hf[f"{Q}.weight"]
    noisy = {**hf, f"{Q}.weight": w * (1 + 1e-7)}
    assert check_deltas(iter(noisy.items()), hf)["problems"] == []
    off = w.clone()
    off[5] += 1e-3 * w.abs().max()
    assert "rows 5 of 32" in check_deltas(iter({**hf, f"{Q}.weight": off}.items()), hf)["problems"][0]


def test_a_weight_adapted_on_one_side_only(adapter_dir):
    path, _ = adapter_dir
    hf = hf_deltas(path)
    megatron = {f"{Q}.weight": hf[f"{Q}.weight"], "model.layers.1.mlp.down_proj.weight": torch.ones(16, 64)}
    problems = check_deltas(iter(megatron.items()), hf)["problems"]
    assert any("Megatron adapts 1 weights the export leaves unchanged" in p for p in problems)
    assert any(f"the export changes 1 weights Megatron does not adapt, e.g. ['{OPROJ}.weight']" in p for p in problems)
