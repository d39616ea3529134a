"""What peft actually loaded is checked module by module: tensors peft leaves unused are named.

A planted fault: an adapter file with tensors for a module that the loaded config does not
target (as peft's MoE conversion does to a dense layer's gate_proj, deepseek_v3 and hy_v3 cells).
"""

from pathlib import Path

import pytest
import torch

from compat.peft_files import check_loaded_by_peft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny_adapter(tmp_path: Path) -> tuple[object, Path]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=32,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(config).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    return config, tmp_path


def _load(config: object, path: Path) -> object:
    torch.manual_seed(1)
    return peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(config).eval(), str(path))


def test_an_adapter_peft_loads_whole_passes(tmp_path):
    config, path = _tiny_adapter(tmp_path)
    assert check_loaded_by_peft(_load(config, path), path) == []


def test_tensors_for_a_module_peft_does_not_adapt_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    config, path = _tiny_adapter(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    for layer in (0, 1):
        prefix = f"base_model.model.model.layers.{layer}.mlp.gate_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.ones(2, 16)
        tensors[f"{prefix}.lora_B.weight"] = torch.ones(32, 2)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    problems = check_loaded_by_peft(_load(config, path), path)
    assert len(problems) == 1
    assert "peft applied no LoRA to 2 modules" in problems[0]
    assert "model.layers.{0,1}.mlp.gate_proj" in problems[0] and "target_modules ['q_proj']" in problems[0]


def test_a_value_peft_changed_on_load_is_named(tmp_path):
    config, path = _tiny_adapter(tmp_path)
    model = _load(config, path)
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight.add_(1.0)
    problems = check_loaded_by_peft(model, path)
    assert problems == [
        "peft did not load base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight: "
        "its parameter base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight differs from the file"
    ]
