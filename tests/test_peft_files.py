"""What peft actually loaded is checked module by module: tensors peft leaves unused are named.

A planted fault: an adapter file with tensors for a module that the loaded config does not
target (as peft's MoE conversion does to a dense layer's gate_proj, deepseek_v3 and hy_v3 cells).
"""

from pathlib import Path

import pytest
import torch

from compat.checks.peft_files import check_loaded_by_peft

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
        "peft did not load 1 tensors of the file: the loaded values differ, e.g. "
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight "
        "(parameter base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight)"
    ]


def _hf_base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=32,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _attn_adapter(tmp_path: Path, use_dora: bool = False) -> tuple[Path, Path]:
    """An adapter as the harness's ``attn`` kind describes it (r=8, alpha=16, q/k/v/o), saved by peft."""
    hf = _hf_base(tmp_path)
    base = transformers.LlamaForCausalLM.from_pretrained(hf)
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False,
        use_dora=use_dora,
    )  # fmt: skip
    model = peft.get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = str(hf)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", hf


def _rewrite(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    save_file(edit(tensors), path / "adapter_model.safetensors", metadata={"format": "pt"})


def test_a_sound_export_has_no_problems(tmp_path):
    from compat.checks.peft_files import check_adapter_dir
    from compat.declare.adapters import get_adapter

    path, hf = _attn_adapter(tmp_path)
    assert check_adapter_dir(path, get_adapter("attn"), hf) == []


def test_without_target_modules_the_tensors_are_still_checked(tmp_path):
    """A config without target_modules still has every tensor, shape and coverage checked."""
    import json

    from compat.checks.peft_files import check_adapter_dir
    from compat.declare.adapters import get_adapter

    path, hf = _attn_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    del config["target_modules"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    _rewrite(path, lambda t: {k: (v[:, :4].contiguous() if k.endswith("layers.0.self_attn.q_proj.lora_A.weight") else v)
                              for k, v in t.items() if "layers.1.self_attn.v_proj" not in k})  # fmt: skip
    problems = "\n".join(check_adapter_dir(path, get_adapter("attn"), hf))
    assert "adapter_config.json has no target_modules" in problems
    assert "layers.0.self_attn.q_proj.lora_A.weight has shape (8, 4), expected (8, 16)" in problems
    assert "the export has no adapter for 1 of the 8 modules" in problems and "layers.{1}.self_attn.v_proj" in problems


def test_unprefixed_keys_are_one_problem_not_one_per_tensor(tmp_path):
    from compat.checks.peft_files import check_adapter_dir
    from compat.declare.adapters import get_adapter

    path, hf = _attn_adapter(tmp_path)
    _rewrite(path, lambda t: {k.removeprefix("base_model.model."): v for k, v in t.items()})
    problems = [p for p in check_adapter_dir(path, get_adapter("attn"), hf) if "not LoRA weight names" in p]
    assert len(problems) == 1, problems
    assert problems[0].startswith("16 of 16 tensors are not LoRA weight names peft loads (no 'base_model.model.'")


def test_dora_magnitudes_are_compared_with_what_peft_loaded(tmp_path):
    """DoRA magnitudes are compared with what peft loaded under its own parameter names: +5.0 on each is seen."""
    path, hf = _attn_adapter(tmp_path, use_dora=True)
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(hf), str(path))
    assert check_loaded_by_peft(model, path) == []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.add_(5.0)
    problems = check_loaded_by_peft(model, path)
    assert len(problems) == 1 and problems[0].startswith("peft did not load 8 tensors of the file")
    assert "lora_magnitude_vector (parameter " in problems[0]


def test_a_tensor_peft_takes_but_no_check_can_place_is_named(tmp_path):
    """A base weight written into the adapter file, which peft loads without a warning, is named."""
    from safetensors.torch import load_file, save_file

    config, path = _tiny_adapter(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.weight"] = torch.zeros(32, 16)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    assert check_loaded_by_peft(_load(config, path), path) == [
        "1 tensors of the file have no place a check can find in the model peft loaded, e.g. "
        "base_model.model.model.embed_tokens.weight (not a LoRA tensor name, in no fused experts)"
    ]


def _moe_adapter(tmp_path: Path, dtype: torch.dtype) -> object:
    """A Qwen3-MoE model (experts fused by transformers) loading per-expert LoRA pairs, as the bridge exports."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=32, num_experts=2, num_experts_per_tok=1, head_dim=8,
    )  # fmt: skip
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "hf")
    shapes = {"gate_proj": (8, 16), "up_proj": (8, 16), "down_proj": (16, 8)}
    tensors = {}
    for e in range(2):
        for proj, (out_f, in_f) in shapes.items():
            tensors[f"base_model.model.model.layers.0.mlp.experts.{e}.{proj}.lora_A.weight"] = torch.randn(2, in_f)
            tensors[f"base_model.model.model.layers.0.mlp.experts.{e}.{proj}.lora_B.weight"] = torch.randn(out_f, 2)
    (tmp_path / "ad").mkdir()
    save_file({k: v.to(dtype) for k, v in tensors.items()}, tmp_path / "ad" / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": list(shapes), "task_type": "CAUSAL_LM"}
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(config))
    base = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype)
    return peft.PeftModel.from_pretrained(base, str(tmp_path / "ad"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_per_expert_tensors_are_compared_with_peft_fused_experts(tmp_path, dtype):
    """The file's per-expert pairs are compared with the ParamWrappers peft fuses them into, value by value."""
    model = _moe_adapter(tmp_path, dtype)
    path = tmp_path / "ad"
    assert check_loaded_by_peft(model, path) == []
    fused = model.base_model.model.model.layers[0].mlp.experts.base_layer  # gate_up_proj's ParamWrapper
    with torch.no_grad():
        fused.lora_A["default"].weight[4:6].add_(1.0)  # expert 1's gate_proj rank rows (peft's layout)
    problems = check_loaded_by_peft(model, path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(
        "peft's fused model.layers.0.mlp.experts.gate_up_proj holds other values than the file's per-expert "
        "tensors for 1 of 4 expert slices, e.g. expert 1 gate_proj (max |diff| "
    ), problems


def test_an_aggregated_problem_carries_every_tensor_it_counts(tmp_path):
    """The message shows a few modules ("e.g."); the problem made of it carries all of them, through the
    record, so an expectation is matched against each (before: only the message, and 16 unprefixed keys
    were two names in the text)."""
    from compat.checks.peft_files import check_adapter_dir
    from compat.checks.problems import Problem
    from compat.declare.adapters import get_adapter

    path, hf = _attn_adapter(tmp_path)
    _rewrite(path, lambda t: {k: v for k, v in t.items() if ".v_proj." not in k and ".k_proj." not in k})
    problems = [Problem("files", p) for p in check_adapter_dir(path, get_adapter("attn"), hf)]
    absent = [p for p in problems if p.message.startswith("the export has no adapter for 4 of the 8 modules")]
    assert len(absent) == 1, problems
    assert absent[0].tensors == tuple(f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "kv")
    assert Problem.from_dict(absent[0].as_dict()) == absent[0]
    assert isinstance(absent[0].message, str) and type(absent[0].message) is str  # plain text in the record

    _rewrite(path, lambda t: {k.removeprefix("base_model.model."): v for k, v in t.items()})
    unprefixed = [Problem("files", p) for p in check_adapter_dir(path, get_adapter("attn"), hf)]
    unprefixed = [p for p in unprefixed if "not LoRA weight names" in p.message]
    assert len(unprefixed[0].tensors) == 8 and all(t.startswith("model.layers.") for t in unprefixed[0].tensors)


@pytest.mark.parametrize("block", ["mlp", "block_sparse_moe"])
def test_mixtral_named_expert_pairs_are_found_in_peft_fused_experts(tmp_path, block):
    """Mixtral's and MiniMax's experts name their projections w1 (gate), w3 (up), w2 (down): transformers fuses
    them as gate_up_proj and down_proj, and the check finds the file's pairs there (a MiniMax-M2 te cell
    whose logits agreed to 3e-7 read "96 tensors of the file have no place a check can find"). The bridge
    writes the checkpoint's block name, block_sparse_moe, which the model calls mlp (one H100, 2026-12-07:
    the same sentence until the file's own block name was looked up)."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=32, num_local_experts=2, num_experts_per_tok=1, head_dim=8,
    )  # fmt: skip
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "hf")
    shapes = {"w1": (8, 16), "w3": (8, 16), "w2": (16, 8)}
    tensors = {
        f"base_model.model.model.layers.0.{block}.experts.{e}.{proj}.lora_{ab}.weight": torch.randn(*shape)
        for e in range(2)
        for proj, (out_f, in_f) in shapes.items()
        for ab, shape in (("A", (2, in_f)), ("B", (out_f, 2)))
    }
    (tmp_path / "ad").mkdir()
    save_file(tensors, tmp_path / "ad" / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": list(shapes), "task_type": "CAUSAL_LM"}
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    base = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf")
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    assert check_loaded_by_peft(model, tmp_path / "ad") == []
